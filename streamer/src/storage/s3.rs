//! A repository in S3-compatible object storage (AWS S3, MinIO, Ceph RGW,
//! Garage, R2): `--repo s3://bucket/prefix`.
//!
//! Requests are signed by `rusty-s3` (AWS Signature V4, presigned URLs) and
//! sent by `ureq`; both are synchronous, so the engine's threads drive
//! uploads and ranged reads with no async runtime, in the CLI and inside a
//! PostgreSQL backend alike.
//!
//! - **Writes.** [`Store::put`] is one PUT: S3 replaces an object
//!   atomically. [`Store::create`] buffers one part and uploads it as a
//!   multipart upload part when full (a single PUT when the object fits in
//!   one part). Parts are 8 MiB for the first 1,000, then double every
//!   1,000: 10,000 parts cover 8 TiB, past S3's 5 TiB object limit, while a
//!   writer holds one part (8 MiB for any stream below 8 GB). An upload
//!   that fails or is dropped is aborted; one left by a killed process is
//!   found by [`Store::incomplete_uploads`] and aborted by the next writer
//!   that holds the lock, or by `blockstream cleanup`.
//! - **Atomicity without rename.** The manifest is the commit point, as in
//!   a directory: a backup prefix without `manifest.json` is not listed.
//! - **Reads.** Ranged GETs per chunk; every request is retried with
//!   exponential backoff on a transport error, a timeout, 408, 429 or 5xx.
//! - **Create-only writes** ([`Store::put_new`], the lock) send
//!   `If-None-Match: *` after a HEAD found no object. Stores that honour
//!   the condition (AWS S3, MinIO, R2) make them atomic; a store that
//!   ignores it (Garage 2.5.0 does) leaves a window between the HEAD and
//!   the PUT in which two writers both succeed.
//! - **The lock** is an object `lock` holding an owner, a random token and a
//!   lease expiry, renewed by a thread every third of the lease. A lock
//!   whose lease ran out (its holder died) is taken over. After writing it,
//!   the taker waits a moment and reads it back: a writer that lost a race
//!   sees another token and backs off. Where conditional writes work this
//!   is mutual exclusion; where they don't it is best effort, and safe
//!   only while a single scheduler starts writers (what pg_cron and a
//!   systemd timer do).
//! - **Logs** ([`Store::append`]) are read, extended and written back: two
//!   processes appending at the same instant can lose one record.
//!
//! Configuration: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`),
//! `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), and
//! `BLOCKSTREAM_S3_ADDRESSING` (`path` or `virtual`; path by default with a
//! custom endpoint); else the profile `AWS_PROFILE` (default `default`) of
//! `~/.aws/credentials` and `~/.aws/config` (or `AWS_SHARED_CREDENTIALS_FILE`
//! and `AWS_CONFIG_FILE`), with the keys `aws_access_key_id`,
//! `aws_secret_access_key`, `aws_session_token`, `region`, `endpoint_url`
//! and `addressing_style`. `AWS_CA_BUNDLE` (or `ca_bundle`) names a PEM
//! file of the certificate authorities to trust instead of the usual web
//! roots, for a store behind a private CA.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::{Deserialize, Serialize};

use super::{check_key, Entry, Kind, ObjectReader, ObjectWriter, RootState, Store, StoreLock, Upload};
use crate::error::{Error, Result};
use crate::timefmt;

/// How long a presigned request stays valid.
const SIGN_FOR: Duration = Duration::from_secs(900);
/// The first 1,000 parts of a multipart upload; the size doubles every 1,000.
pub const FIRST_PART: usize = 8 << 20;
/// The largest error body read from a response.
const ERROR_BODY_MAX: u64 = 64 << 10;
/// A listing response larger than this is refused.
const LIST_BODY_MAX: u64 = 16 << 20;
/// A log object larger than this is not extended.
const LOG_MAX: u64 = 256 << 20;
const LOCK_KEY: &str = "lock";

static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
static PEAK_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// The most bytes this process held in upload buffers at once.
pub fn peak_bytes_in_flight() -> u64 {
    PEAK_IN_FLIGHT.load(Ordering::Relaxed)
}

fn in_flight_add(n: u64) {
    let now = IN_FLIGHT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK_IN_FLIGHT.fetch_max(now, Ordering::Relaxed);
}

fn in_flight_sub(n: u64) {
    IN_FLIGHT.fetch_sub(n, Ordering::Relaxed);
}

/// The size of part `index` (0-based) of a multipart upload.
pub fn part_size(index: usize) -> usize {
    FIRST_PART << (index / 1000).min(10)
}

/// Where and how to reach a bucket.
#[derive(Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Key prefix of the repository, without slashes at either end ("" for the bucket's root).
    pub prefix: String,
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// Tries per request (1 = no retry).
    pub attempts: u32,
    /// Lease of the lock object.
    pub lock_lease: Duration,
    /// PEM file of the certificate authorities to trust (else the web roots).
    pub ca_bundle: Option<PathBuf>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// `s3://bucket/prefix` into the bucket and the prefix.
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let rest =
        url.strip_prefix("s3://").ok_or_else(|| Error::Usage(format!("\"{url}\" is not an s3:// repository URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(Error::Usage(format!(
            "\"{url}\": \"{bucket}\" is not a bucket name (3 to 63 lowercase letters, digits, dots and hyphens)"
        )));
    }
    if !prefix.is_empty() {
        check_key(prefix).map_err(|_| Error::Usage(format!("\"{url}\": \"{prefix}\" is not a plain key prefix")))?;
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// `[section]` → key → value of an AWS-style INI file.
fn read_ini(path: &std::path::Path) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return out };
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone()).or_default().insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

impl S3Config {
    /// The configuration of `s3://bucket/prefix` from the environment and the AWS files.
    pub fn from_url(url: &str) -> Result<S3Config> {
        let (bucket, prefix) = parse_url(url)?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = env("HOME").map(PathBuf::from).unwrap_or_default();
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let creds_file = env("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from).unwrap_or(home.join(".aws/credentials"));
        let config_file = env("AWS_CONFIG_FILE").map(PathBuf::from).unwrap_or(home.join(".aws/config"));
        let mut file: HashMap<String, String> = HashMap::new();
        let config = read_ini(&config_file);
        let section = if profile == "default" { "default".to_string() } else { format!("profile {profile}") };
        file.extend(config.get(&section).cloned().unwrap_or_default());
        file.extend(read_ini(&creds_file).get(&profile).cloned().unwrap_or_default());
        let pick = |envs: &[&str], key: &str| envs.iter().find_map(|e| env(e)).or_else(|| file.get(key).cloned());

        let access_key_id = pick(&["AWS_ACCESS_KEY_ID"], "aws_access_key_id");
        let secret_access_key = pick(&["AWS_SECRET_ACCESS_KEY"], "aws_secret_access_key");
        let (Some(access_key_id), Some(secret_access_key)) = (access_key_id, secret_access_key) else {
            return Err(Error::Usage(format!(
                "no credentials for \"{url}\": set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or profile \"{profile}\" in \"{}\"",
                creds_file.display()
            )));
        };
        let region = pick(&["AWS_REGION", "AWS_DEFAULT_REGION"], "region").unwrap_or_else(|| "us-east-1".into());
        let custom = pick(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"], "endpoint_url");
        let endpoint = custom.clone().unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let path_style = match pick(&["BLOCKSTREAM_S3_ADDRESSING"], "addressing_style").as_deref() {
            Some("path") => true,
            Some("virtual") => false,
            Some(other) => {
                return Err(Error::Usage(format!("addressing style \"{other}\" is neither \"path\" nor \"virtual\"")))
            }
            None => custom.is_some(),
        };
        let attempts = env("BLOCKSTREAM_S3_ATTEMPTS").and_then(|v| v.parse().ok()).unwrap_or(8u32).max(1);
        let lease = env("BLOCKSTREAM_S3_LOCK_LEASE").and_then(|v| v.parse().ok()).unwrap_or(90u64).max(3);
        Ok(S3Config {
            endpoint,
            region,
            bucket,
            prefix,
            path_style,
            access_key_id,
            secret_access_key,
            session_token: pick(&["AWS_SESSION_TOKEN"], "aws_session_token"),
            attempts,
            lock_lease: Duration::from_secs(lease),
            ca_bundle: pick(&["AWS_CA_BUNDLE"], "ca_bundle").map(PathBuf::from),
        })
    }
}

/// Objects (key, size, last modified) and common prefixes of a listing.
type Listing = (Vec<(String, u64, String)>, Vec<String>);

struct Inner {
    bucket: Bucket,
    creds: Credentials,
    /// "" or "prefix/".
    prefix: String,
    agent: ureq::Agent,
    location: String,
    attempts: u32,
    lease: Duration,
}

/// A repository under a key prefix of a bucket.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Store({})", self.inner.location)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Head,
    Put,
    Post,
    Delete,
}

/// An S3 error response: `<Error><Code>..</Code><Message>..</Message></Error>`.
fn error_text(status: u16, body: &str) -> String {
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{t}>"))? + start;
        Some(body[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("HTTP {status} {c}: {m}"),
        (Some(c), None) => format!("HTTP {status} {c}"),
        _ => format!("HTTP {status}"),
    }
}

fn permanent(e: &ureq::Error) -> bool {
    use ureq::Error as E;
    matches!(e, E::Tls(_) | E::Rustls(_) | E::Pem(_) | E::BadUri(_) | E::RequireHttpsOnly(_) | E::TlsRequired)
        || e.to_string().contains("certificate")
}

fn retryable(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

impl S3Store {
    pub fn new(config: &S3Config) -> Result<S3Store> {
        let endpoint: url::Url = config
            .endpoint
            .parse()
            .map_err(|e| Error::Usage(format!("endpoint \"{}\" is not a URL: {e}", config.endpoint)))?;
        let style = if config.path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
        let bucket = Bucket::new(endpoint, style, config.bucket.clone(), config.region.clone())
            .map_err(|e| Error::Usage(format!("endpoint \"{}\": {e}", config.endpoint)))?;
        let creds = match &config.session_token {
            Some(t) => Credentials::new_with_token(&config.access_key_id, &config.secret_access_key, t),
            None => Credentials::new(&config.access_key_id, &config.secret_access_key),
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path).map_err(Error::io("read the CA bundle", path))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(Error::Usage(format!("CA bundle \"{}\" does not parse: {e}", path.display())))
                    }
                }
            }
            if certs.is_empty() {
                return Err(Error::Usage(format!("CA bundle \"{}\" holds no certificate", path.display())));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_recv_body(Some(Duration::from_secs(300)))
            .timeout_send_body(Some(Duration::from_secs(300)))
            .max_idle_connections_per_host(64)
            .user_agent("blockstream")
            .build()
            .into();
        let prefix = if config.prefix.is_empty() { String::new() } else { format!("{}/", config.prefix) };
        let location = format!("s3://{}/{}", config.bucket, config.prefix).trim_end_matches('/').to_string();
        Ok(S3Store {
            inner: Arc::new(Inner {
                bucket,
                creds,
                prefix,
                agent,
                location,
                attempts: config.attempts,
                lease: config.lock_lease,
            }),
        })
    }

    /// The store of an `s3://` URL, configured from the environment.
    pub fn from_url(url: &str) -> Result<S3Store> {
        S3Store::new(&S3Config::from_url(url)?)
    }
}

impl Inner {
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn describe(&self, key: &str) -> String {
        format!("{}/{key}", self.location)
    }

    fn fail(&self, op: &'static str, key: &str, source: std::io::Error) -> Error {
        Error::Io { op, path: PathBuf::from(self.describe(key)), source }
    }

    /// Sends one request, retried with backoff on transport errors and
    /// retryable statuses; `consume` reads an accepted response (its errors
    /// are retried too). A status outside `ok` is an error naming the object.
    #[allow(clippy::too_many_arguments)]
    fn request<T>(
        &self,
        op: &'static str,
        key: &str,
        verb: Verb,
        sign: &dyn Fn() -> url::Url,
        headers: &[(&str, &str)],
        body: &[u8],
        ok: &[u16],
        consume: &mut dyn FnMut(u16, &mut ureq::http::Response<ureq::Body>) -> std::io::Result<T>,
    ) -> Result<T> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let url = sign();
            let sent = match verb {
                Verb::Get | Verb::Head | Verb::Delete => {
                    let mut r = match verb {
                        Verb::Get => self.agent.get(url.as_str()),
                        Verb::Head => self.agent.head(url.as_str()),
                        _ => self.agent.delete(url.as_str()),
                    };
                    for (k, v) in headers {
                        r = r.header(*k, *v);
                    }
                    r.call()
                }
                Verb::Put | Verb::Post => {
                    let mut r =
                        if verb == Verb::Put { self.agent.put(url.as_str()) } else { self.agent.post(url.as_str()) };
                    for (k, v) in headers {
                        r = r.header(*k, *v);
                    }
                    r.send(body)
                }
            };
            let mut last = attempt >= self.attempts;
            let err: std::io::Error = match sent {
                Err(e) => {
                    // A certificate the client does not trust, a bad URL: no retry helps.
                    last |= permanent(&e);
                    std::io::Error::other(e.to_string())
                }
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    if ok.contains(&status) {
                        match consume(status, &mut resp) {
                            Ok(v) => return Ok(v),
                            Err(e) => e,
                        }
                    } else {
                        let text = if verb == Verb::Head {
                            String::new()
                        } else {
                            resp.body_mut().with_config().limit(ERROR_BODY_MAX).read_to_string().unwrap_or_default()
                        };
                        let msg = error_text(status, &text);
                        if status == 404 {
                            return Err(self.fail(op, key, std::io::Error::new(std::io::ErrorKind::NotFound, msg)));
                        }
                        if !retryable(status) || last {
                            let kind = if status == 403 {
                                std::io::ErrorKind::PermissionDenied
                            } else {
                                std::io::ErrorKind::Other
                            };
                            return Err(self.fail(op, key, std::io::Error::new(kind, msg)));
                        }
                        std::io::Error::other(msg)
                    }
                }
            };
            if last {
                let msg = format!("{err} (after {attempt} attempts)");
                return Err(self.fail(op, key, std::io::Error::new(err.kind(), msg)));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    /// The size of an object, None when there is none.
    fn head(&self, key: &str) -> Result<Option<u64>> {
        let full = self.full(key);
        let sign = || self.bucket.head_object(Some(&self.creds), &full).sign(SIGN_FOR);
        match self.request("stat", key, Verb::Head, &sign, &[], &[], &[200], &mut |_, r| Ok(content_length(r))) {
            Ok(len) => Ok(Some(len)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn get(&self, key: &str, max: u64) -> Result<Vec<u8>> {
        let full = self.full(key);
        let sign = || self.bucket.get_object(Some(&self.creds), &full).sign(SIGN_FOR);
        let describe = self.describe(key);
        self.request("read", key, Verb::Get, &sign, &[], &[], &[200], &mut |_, r| {
            let len = content_length(r);
            if len > max {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("\"{describe}\" is {len} bytes, more than the {max} allowed"),
                ));
            }
            let mut out = Vec::with_capacity(len as usize);
            r.body_mut().as_reader().take(max + 1).read_to_end(&mut out)?;
            if out.len() as u64 > max {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("\"{describe}\" is more than the {max} bytes allowed"),
                ));
            }
            Ok(out)
        })
        .map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData => {
                Error::Corrupt(source.to_string().split(" (after").next().unwrap_or_default().to_string())
            }
            e => e,
        })
    }

    fn put_object(&self, key: &str, bytes: &[u8], create_only: bool) -> Result<bool> {
        let full = self.full(key);
        let sign = || {
            let mut a = self.bucket.put_object(Some(&self.creds), &full);
            if create_only {
                a.headers_mut().insert("if-none-match", "*");
            }
            a.sign(SIGN_FOR)
        };
        let headers: &[(&str, &str)] = if create_only { &[("if-none-match", "*")] } else { &[] };
        self.request("put", key, Verb::Put, &sign, headers, bytes, &[200, 412], &mut |s, r| {
            drain(r);
            Ok(s == 200)
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let full = self.full(key);
        let sign = || self.bucket.delete_object(Some(&self.creds), &full).sign(SIGN_FOR);
        match self.request("remove", key, Verb::Delete, &sign, &[], &[], &[200, 204], &mut |_, r| {
            drain(r);
            Ok(())
        }) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    /// Every object under `prefix` (a full key prefix), with `delimiter` the
    /// direct children only.
    fn list_raw(&self, prefix: &str, delimiter: bool) -> Result<Listing> {
        let (mut objects, mut prefixes) = (Vec::new(), Vec::new());
        let mut token: Option<String> = None;
        loop {
            let sign = || {
                let mut a = self.bucket.list_objects_v2(Some(&self.creds));
                a.with_prefix(prefix.to_string());
                if delimiter {
                    a.with_delimiter("/");
                }
                if let Some(t) = &token {
                    a.with_continuation_token(t.clone());
                }
                a.sign(SIGN_FOR)
            };
            let shown = prefix.strip_prefix(&self.prefix).unwrap_or(prefix);
            let page = self.request("list", shown, Verb::Get, &sign, &[], &[], &[200], &mut |_, r| {
                let body =
                    r.body_mut().with_config().limit(LIST_BODY_MAX).read_to_vec().map_err(std::io::Error::other)?;
                rusty_s3::actions::ListObjectsV2::parse_response(&body).map_err(std::io::Error::other)
            })?;
            // Listings ask for URL-encoded keys (encoding-type=url).
            objects.extend(page.contents.into_iter().map(|c| (decode(&c.key), c.size, c.last_modified)));
            prefixes.extend(page.common_prefixes.into_iter().map(|p| decode(&p.prefix)));
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok((objects, prefixes)),
            }
        }
    }

    fn list_uploads(&self) -> Result<Vec<Upload>> {
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let sign = || {
                let mut query: Vec<(&str, &str)> = vec![("uploads", ""), ("prefix", &self.prefix)];
                if let Some((k, u)) = &markers {
                    query.push(("key-marker", k));
                    query.push(("upload-id-marker", u));
                }
                query.sort();
                rusty_s3::signing::sign(
                    &jiff::Timestamp::now(),
                    rusty_s3::Method::Get,
                    self.bucket.base_url().clone(),
                    self.creds.key(),
                    self.creds.secret(),
                    self.creds.token(),
                    self.bucket.region(),
                    SIGN_FOR.as_secs(),
                    query.clone().into_iter(),
                    std::iter::empty(),
                )
            };
            let page: ListUploads =
                self.request("list uploads", "", Verb::Get, &sign, &[], &[], &[200], &mut |_, r| {
                    let body = r
                        .body_mut()
                        .with_config()
                        .limit(LIST_BODY_MAX)
                        .read_to_string()
                        .map_err(std::io::Error::other)?;
                    quick_xml::de::from_str(&body).map_err(std::io::Error::other)
                })?;
            for u in page.uploads {
                if let Some(key) = u.key.strip_prefix(&self.prefix) {
                    out.push(Upload { key: key.to_string(), id: u.upload_id, initiated: u.initiated });
                }
            }
            match (page.is_truncated, page.next_key_marker, page.next_upload_id_marker) {
                (true, Some(k), Some(u)) if !k.is_empty() => markers = Some((k, u)),
                _ => return Ok(out),
            }
        }
    }

    fn abort(&self, key: &str, upload_id: &str) -> Result<()> {
        let full = self.full(key);
        let sign = || self.bucket.abort_multipart_upload(Some(&self.creds), &full, upload_id).sign(SIGN_FOR);
        match self.request("abort upload of", key, Verb::Delete, &sign, &[], &[], &[200, 204], &mut |_, r| {
            drain(r);
            Ok(())
        }) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListUploads {
    #[serde(default)]
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_upload_id_marker: Option<String>,
    #[serde(rename = "Upload", default)]
    uploads: Vec<UploadXml>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadXml {
    key: String,
    upload_id: String,
    #[serde(default)]
    initiated: String,
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn content_length(r: &ureq::http::Response<ureq::Body>) -> u64 {
    r.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn drain(r: &mut ureq::http::Response<ureq::Body>) {
    let _ = std::io::copy(&mut r.body_mut().as_reader().take(ERROR_BODY_MAX), &mut std::io::sink());
}

struct S3Reader {
    inner: Arc<Inner>,
    key: String,
    len: u64,
}

impl ObjectReader for S3Reader {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} bytes at {offset} are past the end of the {}-byte object", buf.len(), self.len),
            )
        })?;
        let range = format!("bytes={offset}-{}", end - 1);
        let inner = &self.inner;
        let full = inner.full(&self.key);
        let sign = || {
            let mut a = inner.bucket.get_object(Some(&inner.creds), &full);
            a.headers_mut().insert("range", range.clone());
            a.sign(SIGN_FOR)
        };
        let whole = offset == 0 && end == self.len;
        inner
            .request("read", &self.key, Verb::Get, &sign, &[("range", &range)], &[], &[200, 206], &mut |s, r| {
                if s == 200 && !whole {
                    return Err(std::io::Error::other("the store ignored the byte range"));
                }
                let mut reader = r.body_mut().as_reader();
                reader.read_exact(buf)?;
                Ok(())
            })
            .map_err(|e| match e {
                Error::Io { source, .. } => source,
                e => std::io::Error::other(e.to_string()),
            })
    }
}

struct S3Writer {
    inner: Arc<Inner>,
    key: String,
    buf: Vec<u8>,
    upload: Option<String>,
    etags: Vec<String>,
    /// Bytes of `buf` counted in flight.
    counted: u64,
    done: bool,
}

impl S3Writer {
    fn count(&mut self) {
        let now = self.buf.len() as u64;
        if now > self.counted {
            in_flight_add(now - self.counted);
        } else {
            in_flight_sub(self.counted - now);
        }
        self.counted = now;
    }

    fn upload_part(&mut self, bytes: &[u8]) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let full = inner.full(&self.key);
        if self.upload.is_none() {
            let sign = || inner.bucket.create_multipart_upload(Some(&inner.creds), &full).sign(SIGN_FOR);
            let id =
                inner.request("start upload of", &self.key, Verb::Post, &sign, &[], &[], &[200], &mut |_, r| {
                    let body = r
                        .body_mut()
                        .with_config()
                        .limit(ERROR_BODY_MAX)
                        .read_to_vec()
                        .map_err(std::io::Error::other)?;
                    let resp = rusty_s3::actions::CreateMultipartUpload::parse_response(&body)
                        .map_err(std::io::Error::other)?;
                    Ok(resp.upload_id().to_string())
                })?;
            self.upload = Some(id);
        }
        let id = self.upload.clone().expect("started above");
        let number = u16::try_from(self.etags.len() + 1)
            .ok()
            .filter(|&n| n <= 10_000)
            .ok_or_else(|| Error::Usage(format!("\"{}\" needs more than 10000 parts", inner.describe(&self.key))))?;
        let sign = || inner.bucket.upload_part(Some(&inner.creds), &full, number, &id).sign(SIGN_FOR);
        let etag = inner.request("upload part of", &self.key, Verb::Put, &sign, &[], bytes, &[200], &mut |_, r| {
            let etag = r.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
            drain(r);
            etag.ok_or_else(|| std::io::Error::other("the store sent no ETag for the part"))
        })?;
        self.etags.push(etag);
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn write_all(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let size = part_size(self.etags.len());
            let take = (size - self.buf.len()).min(bytes.len());
            if self.buf.capacity() < size {
                self.buf.reserve_exact(size - self.buf.len());
            }
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            self.count();
            if self.buf.len() == size {
                let part = std::mem::take(&mut self.buf);
                let sent = self.upload_part(&part);
                self.buf = part;
                self.buf.clear();
                self.count();
                sent?;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let Some(id) = self.upload.clone() else {
            let part = std::mem::take(&mut self.buf);
            inner.put_object(&self.key, &part, false)?;
            self.count();
            self.done = true;
            return Ok(());
        };
        if !self.buf.is_empty() {
            let part = std::mem::take(&mut self.buf);
            self.upload_part(&part)?;
            self.count();
        }
        let full = inner.full(&self.key);
        let etags = self.etags.clone();
        let sign = || {
            inner
                .bucket
                .complete_multipart_upload(Some(&inner.creds), &full, &id, etags.iter().map(String::as_str))
                .sign(SIGN_FOR)
        };
        let body = inner
            .bucket
            .complete_multipart_upload(Some(&inner.creds), &full, &id, etags.iter().map(String::as_str))
            .body();
        inner.request(
            "complete upload of",
            &self.key,
            Verb::Post,
            &sign,
            &[],
            body.as_bytes(),
            &[200],
            &mut |_, r| {
                // S3 may answer 200 and put the error in the body.
                let text =
                    r.body_mut().with_config().limit(ERROR_BODY_MAX).read_to_string().map_err(std::io::Error::other)?;
                if text.contains("<Error>") {
                    return Err(std::io::Error::other(error_text(200, &text)));
                }
                Ok(())
            },
        )?;
        self.done = true;
        Ok(())
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        self.buf = Vec::new();
        self.count();
        if !self.done {
            if let Some(id) = self.upload.take() {
                let _ = self.inner.abort(&self.key, &id);
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct LockBody {
    owner: String,
    token: String,
    /// Seconds since the epoch when the lease runs out.
    expires: u64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lock_token() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut seed = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut seed);
    }
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{nanos}-{hex}", std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

struct S3Lock {
    inner: Arc<Inner>,
    token: String,
    taken_over: Option<String>,
    stop: Option<crossbeam_channel::Sender<()>>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for S3Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Lock({})", self.inner.describe(LOCK_KEY))
    }
}

impl StoreLock for S3Lock {
    fn taken_over(&self) -> Option<&str> {
        self.taken_over.as_deref()
    }
}

impl Drop for S3Lock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
        if let Ok(bytes) = self.inner.get(LOCK_KEY, 1 << 16) {
            if serde_json::from_slice::<LockBody>(&bytes).is_ok_and(|b| b.token == self.token) {
                let _ = self.inner.delete(LOCK_KEY);
            }
        }
    }
}

impl Inner {
    fn read_lock(&self) -> Result<Option<LockBody>> {
        match self.get(LOCK_KEY, 1 << 16) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).unwrap_or(LockBody {
                owner: "an unreadable lock object".into(),
                token: String::new(),
                expires: 0,
            }))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn take_lock(self: &Arc<Self>) -> Result<S3Lock> {
        let held = |b: &LockBody| {
            Error::Conflict(format!(
                "repository \"{}\" is locked by another blockstream process ({}, lease until {})",
                self.location,
                b.owner,
                timefmt::iso8601(UNIX_EPOCH + Duration::from_secs(b.expires))
            ))
        };
        let current = self.read_lock()?;
        let taken_over = match &current {
            Some(b) if b.expires > unix_now() => return Err(held(b)),
            Some(b) => Some(b.owner.clone()),
            None => None,
        };
        let token = lock_token();
        let owner =
            format!("host {} pid {} since {}", hostname(), std::process::id(), timefmt::iso8601(SystemTime::now()));
        let body = {
            let token = token.clone();
            move |expires| serde_json::to_vec(&LockBody { owner: owner.clone(), token: token.clone(), expires })
        };
        let bytes = body(unix_now() + self.lease.as_secs()).expect("a lock serializes");
        if !self.put_object(LOCK_KEY, &bytes, current.is_none())? {
            return Err(self.read_lock()?.map(|b| held(&b)).unwrap_or_else(|| {
                Error::Conflict(format!("repository \"{}\" is locked by another blockstream process", self.location))
            }));
        }
        // A writer that raced with us and wrote after us wins; so does one a
        // store honouring If-None-Match let through first.
        std::thread::sleep(Duration::from_millis(300));
        match self.read_lock()? {
            Some(b) if b.token == token => {}
            Some(b) => return Err(held(&b)),
            None => return Err(Error::Conflict(format!("the lock of \"{}\" vanished while taken", self.location))),
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let me = Arc::clone(self);
        let (tok, lease) = (token.clone(), self.lease);
        let renewer = std::thread::Builder::new()
            .name("s3-lock".into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(lease / 3) {
                    match me.read_lock() {
                        Ok(Some(b)) if b.token == tok => {
                            let _ =
                                me.put_object(LOCK_KEY, &body(unix_now() + lease.as_secs()).unwrap_or_default(), false);
                        }
                        Ok(_) => {
                            eprintln!(
                                "blockstream: warning: the lock of \"{}\" was taken by another process",
                                me.location
                            );
                            return;
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(|e| Error::Io {
                op: "start the lock thread for",
                path: PathBuf::from(&self.location),
                source: e,
            })?;
        Ok(S3Lock { inner: Arc::clone(self), token, taken_over, stop: Some(stop), renewer: Some(renewer) })
    }
}

impl Store for S3Store {
    fn location(&self) -> String {
        self.inner.location.clone()
    }

    fn describe(&self, key: &str) -> String {
        self.inner.describe(key)
    }

    fn root_state(&self) -> Result<RootState> {
        let inner = &self.inner;
        let sign = || {
            let mut a = inner.bucket.list_objects_v2(Some(&inner.creds));
            a.with_prefix(inner.prefix.clone());
            a.with_max_keys(1);
            a.sign(SIGN_FOR)
        };
        let any = inner.request("list", "", Verb::Get, &sign, &[], &[], &[200], &mut |_, r| {
            let body = r.body_mut().with_config().limit(LIST_BODY_MAX).read_to_vec().map_err(std::io::Error::other)?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&body).map_err(std::io::Error::other)?;
            Ok(!page.contents.is_empty())
        })?;
        // A prefix exists only while it holds objects: empty and missing are one.
        Ok(if any { RootState::Holds } else { RootState::Missing })
    }

    fn init(&self) -> Result<()> {
        Ok(())
    }

    fn read(&self, key: &str, max: u64) -> Result<Vec<u8>> {
        check_key(key)?;
        self.inner.get(key, max)
    }

    fn open(&self, key: &str) -> Result<Box<dyn ObjectReader>> {
        check_key(key)?;
        let len = self.inner.head(key)?.ok_or_else(|| {
            self.inner.fail("open", key, std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"))
        })?;
        Ok(Box::new(S3Reader { inner: Arc::clone(&self.inner), key: key.to_string(), len }))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        check_key(key)?;
        self.inner.put_object(key, bytes, false).map(|_| ())
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        check_key(key)?;
        if self.inner.head(key)?.is_some() {
            return Ok(false);
        }
        self.inner.put_object(key, bytes, true)
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        check_key(key)?;
        if self.inner.head(key)?.is_some() {
            return Err(Error::Conflict(format!("\"{}\" already exists", self.inner.describe(key))));
        }
        Ok(Box::new(S3Writer {
            inner: Arc::clone(&self.inner),
            key: key.to_string(),
            buf: Vec::new(),
            upload: None,
            etags: Vec::new(),
            counted: 0,
            done: false,
        }))
    }

    fn append(&self, key: &str, record: &[u8]) -> Result<()> {
        check_key(key)?;
        let mut log = match self.inner.get(key, LOG_MAX) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e),
        };
        log.extend_from_slice(record);
        self.inner.put_object(key, &log, false).map(|_| ())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let base = if prefix.is_empty() { self.inner.prefix.clone() } else { format!("{}/", self.inner.full(prefix)) };
        let (objects, prefixes) = self.inner.list_raw(&base, true)?;
        let mut out = Vec::new();
        for p in prefixes {
            let name = p.strip_prefix(&base).unwrap_or(&p).trim_end_matches('/');
            if !name.is_empty() && !name.contains('/') {
                out.push(Entry { name: name.to_string(), kind: Kind::Prefix, size: 0, modified: None });
            }
        }
        for (key, size, modified) in objects {
            let Some(name) = key.strip_prefix(&base) else { continue };
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let modified = timefmt::parse_iso8601(&format!("{}Z", modified.get(..19).unwrap_or_default()))
                .map(|s| UNIX_EPOCH + Duration::from_secs(s));
            out.push(Entry { name: name.to_string(), kind: Kind::Object, size, modified });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn remove(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.inner.delete(key)
    }

    fn remove_prefix(&self, prefix: &str) -> Result<()> {
        check_key(prefix)?;
        let base = format!("{}/", self.inner.full(prefix));
        let (objects, _) = self.inner.list_raw(&base, false)?;
        // The manifest first: a backup half removed is no longer listed.
        let mut keys: Vec<String> = objects
            .into_iter()
            .filter_map(|(k, _, _)| k.strip_prefix(&self.inner.prefix).map(str::to_string))
            .collect();
        keys.sort_by_key(|k| (!k.ends_with("/manifest.json"), k.clone()));
        for key in &keys {
            self.inner.delete(key)?;
        }
        // Some stores (Garage) list a removed prefix for a moment after its
        // last object is gone; wait until the parent's listing no longer
        // shows it, so that a caller listing next (expire, then info) sees
        // the removal.
        let (parent, name) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        for _ in 0..100 {
            if self.list(parent)?.iter().all(|e| e.name != name) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::Conflict(format!(
            "\"{}\" is still listed 10 s after its {} objects were removed",
            self.inner.describe(prefix),
            keys.len()
        )))
    }

    fn lock(&self) -> Result<Box<dyn StoreLock>> {
        Ok(Box::new(self.inner.take_lock()?))
    }

    fn total_bytes(&self) -> u64 {
        self.inner.list_raw(&self.inner.prefix, false).map_or(0, |(o, _)| o.iter().map(|(_, s, _)| s).sum())
    }

    fn incomplete_uploads(&self) -> Result<Vec<Upload>> {
        self.inner.list_uploads()
    }

    fn abort_upload(&self, upload: &Upload) -> Result<()> {
        check_key(&upload.key)?;
        self.inner.abort(&upload.key, &upload.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_url("s3://blockstream/prod/db1").unwrap(), ("blockstream".into(), "prod/db1".into()));
        assert_eq!(parse_url("s3://blockstream").unwrap(), ("blockstream".into(), String::new()));
        assert_eq!(parse_url("s3://blockstream/x/").unwrap(), ("blockstream".into(), "x".into()));
        for bad in ["s3://B/x", "s3://ab", "s3://bucket/a/../b", "/srv/repo", "s3://bu_cket/x"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parts_cover_five_tebibytes_in_ten_thousand() {
        let total: u64 = (0..10_000).map(|i| part_size(i) as u64).sum();
        assert!(total > 5 << 40, "{total}");
        assert_eq!(part_size(0), 8 << 20);
        assert_eq!(part_size(999), 8 << 20);
        assert_eq!(part_size(1000), 16 << 20);
    }

    #[test]
    fn error_responses_are_named() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>bad sig</Message></Error>";
        assert_eq!(error_text(403, body), "HTTP 403 SignatureDoesNotMatch: bad sig");
        assert_eq!(error_text(500, ""), "HTTP 500");
    }
}
