//! The connection to PostgreSQL: libpq itself (through `pq-sys`), so that a
//! connection behaves exactly as psql's for the same parameters and
//! environment: connection strings and URIs, `PGHOST`/`PGPORT`/`PGUSER`/...,
//! `sslmode` and the other TLS settings, `.pgpass` and `PGPASSFILE`, service
//! files (`PGSERVICE`, `pg_service.conf`), `PGCONNECT_TIMEOUT`, Kerberos.
//! pg_basebackup and pgBackRest connect the same way.
//!
//! The layer is small: connect, run a query with text parameters and text
//! results, describe the connection for messages (never the password).

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr;

use pq_sys as pq;

/// An error PostgreSQL reported, with its SQLSTATE when it has one.
#[derive(Debug, Clone)]
pub struct DbError {
    pub sqlstate: Option<String>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(s) = &self.sqlstate {
            write!(f, " (SQLSTATE {s})")?;
        }
        if let Some(h) = self.hint.as_ref().or(self.detail.as_ref()) {
            write!(f, ": {h}")?;
        }
        Ok(())
    }
}

/// Rows of text values (NULL is None).
pub struct Rows {
    pub rows: Vec<Vec<Option<String>>>,
}

impl Rows {
    /// Column `col` of row `row`; None when NULL or absent.
    pub fn get(&self, row: usize, col: usize) -> Option<&str> {
        self.rows.get(row).and_then(|r| r.get(col)).and_then(|v| v.as_deref())
    }
}

/// An open connection; closed on drop.
pub struct Conn {
    raw: *mut pq::PGconn,
}

// SAFETY: a PGconn may move between threads as long as one thread uses it at
// a time, which `&mut self` on every use guarantees.
unsafe impl Send for Conn {}

fn text(p: *const c_char) -> Option<String> {
    // SAFETY: libpq returns NUL-terminated strings or NULL.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// `host=... port=... user=... dbname=...` of a connection (even a failed one).
fn describe_raw(raw: *mut pq::PGconn) -> String {
    // SAFETY: these accessors accept any PGconn, connected or not.
    unsafe {
        format!(
            "host={} port={} user={} dbname={}",
            text(pq::PQhost(raw)).unwrap_or_default(),
            text(pq::PQport(raw)).unwrap_or_default(),
            text(pq::PQuser(raw)).unwrap_or_default(),
            text(pq::PQdb(raw)).unwrap_or_default()
        )
    }
}

impl Conn {
    /// Connects with libpq keywords (`dbname` may be a connection string or
    /// URI; libpq expands it, as psql does). Err: what failed and where.
    pub fn connect(params: &[(&str, &str)]) -> Result<Conn, String> {
        let cstrings: Vec<(CString, CString)> = params
            .iter()
            .map(|(k, v)| {
                Ok((
                    CString::new(*k).map_err(|_| format!("connection keyword \"{k}\" contains a NUL byte"))?,
                    CString::new(*v).map_err(|_| format!("connection parameter {k} contains a NUL byte"))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        let mut keys: Vec<*const c_char> = cstrings.iter().map(|(k, _)| k.as_ptr()).collect();
        let mut values: Vec<*const c_char> = cstrings.iter().map(|(_, v)| v.as_ptr()).collect();
        keys.push(ptr::null());
        values.push(ptr::null());
        // SAFETY: two NULL-terminated arrays of NUL-terminated strings that
        // outlive the call; expand_dbname = 1 as psql passes it.
        let raw = unsafe { pq::PQconnectdbParams(keys.as_ptr(), values.as_ptr(), 1) };
        if raw.is_null() {
            return Err("out of memory while connecting".into());
        }
        // SAFETY: raw is a PGconn returned by libpq.
        if unsafe { pq::PQstatus(raw) } != pq::ConnStatusType::CONNECTION_OK {
            // SAFETY: as above; the message is copied before PQfinish frees it.
            let msg = text(unsafe { pq::PQerrorMessage(raw) }).unwrap_or_default();
            let target = describe_raw(raw);
            // SAFETY: raw is ours and used no more.
            unsafe { pq::PQfinish(raw) };
            let msg = msg.trim().replace('\n', " ").replace('\t', "");
            return Err(format!("could not connect to server ({target}): {msg}"));
        }
        Ok(Conn { raw })
    }

    /// `host=... port=... user=... dbname=...`, for messages.
    pub fn describe(&self) -> String {
        describe_raw(self.raw)
    }

    /// Whether the connection is encrypted with TLS.
    pub fn ssl_in_use(&self) -> bool {
        // SAFETY: raw is a live connection.
        unsafe { pq::PQsslInUse(self.raw) == 1 }
    }

    /// Runs one statement with text parameters; returns its rows as text.
    pub fn query(&mut self, sql: &str, params: &[Option<&str>]) -> Result<Rows, DbError> {
        let local = |message: String| DbError { sqlstate: None, message, detail: None, hint: None };
        let csql = CString::new(sql).map_err(|_| local("query contains a NUL byte".into()))?;
        let cparams: Vec<Option<CString>> = params
            .iter()
            .map(|p| {
                p.map(|v| CString::new(v).map_err(|_| local("a query parameter contains a NUL byte".into())))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let values: Vec<*const c_char> =
            cparams.iter().map(|p| p.as_ref().map_or(ptr::null(), |c| c.as_ptr())).collect();
        // SAFETY: every pointer outlives the call; NULL parameter types mean
        // "infer", NULL lengths and formats mean text.
        let res = unsafe {
            pq::PQexecParams(
                self.raw,
                csql.as_ptr(),
                values.len() as i32,
                ptr::null(),
                if values.is_empty() { ptr::null() } else { values.as_ptr() },
                ptr::null(),
                ptr::null(),
                0,
            )
        };
        self.collect(res)
    }

    /// Runs a script of one or more statements (simple query protocol).
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        self.simple(sql).map(|_| ())
    }

    /// Runs one statement with the simple query protocol, the only one a
    /// replication connection speaks; returns the rows of its last result.
    pub fn simple(&mut self, sql: &str) -> Result<Rows, DbError> {
        let csql = CString::new(sql).map_err(|_| DbError {
            sqlstate: None,
            message: "script contains a NUL byte".into(),
            detail: None,
            hint: None,
        })?;
        // SAFETY: a live connection and a NUL-terminated script.
        let res = unsafe { pq::PQexec(self.raw, csql.as_ptr()) };
        self.collect(res)
    }

    fn collect(&mut self, res: *mut pq::PGresult) -> Result<Rows, DbError> {
        if res.is_null() {
            // SAFETY: a live connection.
            let message = text(unsafe { pq::PQerrorMessage(self.raw) }).unwrap_or_default().trim().to_string();
            return Err(DbError { sqlstate: None, message, detail: None, hint: None });
        }
        // SAFETY: res is a result libpq returned; it is cleared exactly once below.
        let out = unsafe {
            match pq::PQresultStatus(res) {
                pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_COMMAND_OK => {
                    let (n, f) = (pq::PQntuples(res), pq::PQnfields(res));
                    let mut rows = Vec::with_capacity(n.max(0) as usize);
                    for r in 0..n {
                        let mut row = Vec::with_capacity(f.max(0) as usize);
                        for c in 0..f {
                            row.push(if pq::PQgetisnull(res, r, c) == 1 {
                                None
                            } else {
                                text(pq::PQgetvalue(res, r, c))
                            });
                        }
                        rows.push(row);
                    }
                    Ok(Rows { rows })
                }
                _ => {
                    let field = |code: u8| text(pq::PQresultErrorField(res, code as i32));
                    let message = field(b'M')
                        .or_else(|| text(pq::PQresultErrorMessage(res)))
                        .unwrap_or_else(|| "query failed".into())
                        .trim()
                        .to_string();
                    Err(DbError { sqlstate: field(b'C'), message, detail: field(b'D'), hint: field(b'H') })
                }
            }
        };
        // SAFETY: as above.
        unsafe { pq::PQclear(res) };
        out
    }
}

/// One message of a COPY BOTH stream (streaming replication).
pub enum Copy {
    Data(Vec<u8>),
    /// Nothing arrived within the wait.
    Idle,
    /// The server ended the stream.
    End,
}

impl Conn {
    /// Sends a command that switches to COPY BOTH (START_REPLICATION).
    pub fn start_copy_both(&mut self, sql: &str) -> Result<(), DbError> {
        let csql = CString::new(sql).map_err(|_| DbError {
            sqlstate: None,
            message: "command contains a NUL byte".into(),
            detail: None,
            hint: None,
        })?;
        // SAFETY: a live connection and a NUL-terminated command.
        let res = unsafe { pq::PQexec(self.raw, csql.as_ptr()) };
        // SAFETY: res is a result libpq returned (or NULL); cleared once.
        let status = unsafe {
            if res.is_null() {
                None
            } else {
                Some(pq::PQresultStatus(res))
            }
        };
        if status == Some(pq::ExecStatusType::PGRES_COPY_BOTH) {
            // SAFETY: as above.
            unsafe { pq::PQclear(res) };
            return Ok(());
        }
        self.collect(res).map(|_| ()).and(Err(DbError {
            sqlstate: None,
            message: format!("\"{sql}\" did not start a replication stream"),
            detail: None,
            hint: None,
        }))
    }

    /// The next message of the stream, waiting up to `wait` for one.
    pub fn get_copy(&mut self, wait: std::time::Duration) -> Result<Copy, String> {
        let error = |c: &Conn| {
            // SAFETY: a live connection.
            text(unsafe { pq::PQerrorMessage(c.raw) }).unwrap_or_default().trim().to_string()
        };
        loop {
            let mut buf: *mut c_char = ptr::null_mut();
            // SAFETY: libpq allocates the buffer; we free it with PQfreemem.
            let n = unsafe { pq::PQgetCopyData(self.raw, &mut buf, 1) };
            if n > 0 {
                // SAFETY: buf holds n bytes.
                let data = unsafe { std::slice::from_raw_parts(buf as *const u8, n as usize) }.to_vec();
                // SAFETY: as above.
                unsafe { pq::PQfreemem(buf.cast()) };
                return Ok(Copy::Data(data));
            }
            if n == -1 {
                // SAFETY: drain the final result of the COPY.
                unsafe {
                    let res = pq::PQgetResult(self.raw);
                    if !res.is_null() {
                        pq::PQclear(res);
                    }
                }
                return Ok(Copy::End);
            }
            if n == -2 {
                return Err(error(self));
            }
            // n == 0: nothing buffered; wait for the socket.
            // SAFETY: poll on libpq's own socket.
            let ready = unsafe {
                let mut fds = libc::pollfd { fd: pq::PQsocket(self.raw), events: libc::POLLIN, revents: 0 };
                libc::poll(&mut fds, 1, wait.as_millis() as i32)
            };
            if ready == 0 {
                return Ok(Copy::Idle);
            }
            // SAFETY: a live connection.
            if unsafe { pq::PQconsumeInput(self.raw) } == 0 {
                return Err(error(self));
            }
        }
    }

    /// Sends one message of the stream and flushes it.
    pub fn put_copy(&mut self, data: &[u8]) -> Result<(), String> {
        // SAFETY: data outlives the call; flush blocks until sent.
        let ok = unsafe {
            pq::PQputCopyData(self.raw, data.as_ptr().cast(), data.len() as i32) == 1 && pq::PQflush(self.raw) == 0
        };
        if ok {
            Ok(())
        } else {
            // SAFETY: a live connection.
            Err(text(unsafe { pq::PQerrorMessage(self.raw) }).unwrap_or_default().trim().to_string())
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: raw is ours and used no more.
        unsafe { pq::PQfinish(self.raw) };
    }
}
