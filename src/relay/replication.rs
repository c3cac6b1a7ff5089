//! PostgreSQL streaming-replication client for logical decoding.
//!
//! # Why our own client
//!
//! `tokio-postgres` does not speak the replication sub-protocol. The one
//! maintained crate that does is a young, single-maintainer project that is
//! built around a background task which decides on its own when to send
//! standby status updates, reports the start position as flushed until told
//! otherwise, answers the server's reply requests by itself and rewrites
//! Begin/Commit payloads into its own events. Server errors reach the caller
//! as strings, so "slot is in use" could only be recognised by parsing
//! localised text. The position we confirm to the server is the one promise
//! this product makes (nothing before it may ever be lost), so we want every
//! status update to be an explicit call made by the relay, and typed errors.
//!
//! The part we need is small: the startup and authentication exchange,
//! `IDENTIFY_SYSTEM`, `START_REPLICATION` and the CopyBoth framing. Message
//! encoding and the SCRAM/MD5 computations come from `postgres-protocol`, the
//! codec crate under `tokio-postgres`, so the security-sensitive parts are not
//! ours.
//!
//! # Shape
//!
//! [`ReplicationConnection::connect`] authenticates a `replication=database`
//! session; [`ReplicationConnection::start_logical`] turns it into a
//! [`ReplicationStream`], which [`ReplicationStream::split`] divides into a
//! [`ReplicationReader`] and a [`ReplicationWriter`] so that one task can read
//! WAL while another confirms positions.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

use super::lsn::Lsn;
pub use super::pgoutput::PgTimestamp;
use crate::api::PgSslMode;
use crate::postgres::ident::reject_nul;
use crate::postgres::{PgError, quote_ident, quote_replication_literal, tls_client_config};

/// Largest backend message we accept. PostgreSQL cannot build a single value
/// over 1 GiB, so a longer length can only be corruption; refusing it keeps a
/// broken length field from making us reserve gigabytes.
const MAX_MESSAGE_LEN: usize = (1 << 30) + (1 << 20);

/// How much free buffer space each socket read asks for. Large reads keep
/// system calls per message low when the server is streaming a backlog.
const READ_CHUNK: usize = 128 * 1024;

/// Where and how to open the replication connection.
#[derive(Clone)]
pub struct ReplicationConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// Shown in `pg_stat_replication` / `pg_stat_activity`, which is how an
    /// operator tells our walsender apart from others.
    pub application_name: String,
    /// libpq's `sslmode`, applied as for the SQL connections
    /// ([`tls_client_config`]); `Prefer` also falls back to plaintext when
    /// the server refuses TLS or the handshake fails.
    pub ssl_mode: PgSslMode,
    /// CA certificate(s) to trust, PEM. Required for `VerifyCa` and
    /// `VerifyFull`; with `Require` it makes the certificate checked as with
    /// `VerifyCa`.
    pub ca_pem: Option<Vec<u8>>,
    /// Bound on TCP connect, TLS and authentication together.
    pub connect_timeout: Duration,
    /// Answer a cleartext password request without TLS (`crate::postgres::auth`).
    pub allow_cleartext_password: bool,
    /// Keepalive and user timeout of the socket.
    pub tcp: TcpLiveness,
}

impl ReplicationConfig {
    /// The same server, credentials and TLS policy as an ordinary SQL connection,
    /// with the replication client's default connect timeout.
    pub fn from_connect(c: &crate::postgres::PgConnectConfig) -> Self {
        let mut r = Self::new(&c.host, c.port, &c.user, &c.dbname);
        r.password = c.password.clone();
        r.application_name = c.application_name.clone();
        r.ssl_mode = c.ssl_mode;
        r.ca_pem = c.ca_pem.clone();
        r.allow_cleartext_password = c.allow_cleartext_password;
        r
    }

    /// A config with libpq-like defaults: TLS preferred, no password, a 30 s
    /// connect timeout.
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>, dbname: impl Into<String>) -> Self {
        ReplicationConfig {
            host: host.into(),
            port,
            user: user.into(),
            password: None,
            dbname: dbname.into(),
            application_name: "outbox-relay".to_owned(),
            ssl_mode: PgSslMode::Prefer,
            ca_pem: None,
            connect_timeout: Duration::from_secs(30),
            allow_cleartext_password: false,
            tcp: TcpLiveness::default(),
        }
    }
}

// Hand-written so the password never reaches a log line.
impl fmt::Debug for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("ssl_mode", &self.ssl_mode)
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("<{} bytes>", p.len())))
            .field("connect_timeout", &self.connect_timeout)
            .field("tcp", &self.tcp)
            .finish()
    }
}

/// What the connection was doing when the server reported an error. The same
/// SQLSTATE means different things at different steps (42704 while starting
/// is the slot; while streaming it is usually a publication).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Startup,
    Query,
    StartReplication,
    Streaming,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Startup => "startup",
            Phase::Query => "query",
            Phase::StartReplication => "START_REPLICATION",
            Phase::Streaming => "streaming",
        })
    }
}

/// An ErrorResponse from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Non-localised severity (`ERROR`, `FATAL`, `PANIC`) when the server sends it.
    pub severity: String,
    /// SQLSTATE, e.g. `55006`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub phase: Phase,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} during {}: {}",
            self.severity, self.code, self.phase, self.message
        )?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

/// Errors of the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {host}:{port} did not complete within {after:?}")]
    ConnectTimeout { host: String, port: u16, after: Duration },
    #[error("I/O error while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("server closed the connection while {context}")]
    ConnectionClosed { context: &'static str },
    #[error("sslmode {mode:?} but the server does not accept TLS connections")]
    TlsUnsupported { mode: PgSslMode },
    #[error("TLS setup failed: {reason}")]
    TlsConfig { reason: String },
    #[error("TLS handshake with {host} failed: {source}")]
    TlsHandshake {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("server requires {method} authentication but no password is configured")]
    PasswordRequired { method: &'static str },
    #[error(
        "server asked for the password in clear text over an unencrypted connection; refused (use TLS, \
         scram-sha-256, or spec.database.tls.allowCleartextPassword)"
    )]
    CleartextPasswordRefused,
    #[error("server asked for unsupported authentication method {method}")]
    UnsupportedAuth { method: String },
    #[error("authentication exchange failed: {reason}")]
    AuthProtocol { reason: String },
    #[error("PostgreSQL error: {0}")]
    Server(Box<ServerError>),
    #[error("replication protocol violation: {reason}")]
    Protocol { reason: String },
    #[error("server sent a {len}-byte message, more than the {max}-byte limit")]
    MessageTooLarge { len: usize, max: usize },
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
}

impl ReplicationError {
    /// Stable name for metrics and status conditions. Server errors that the
    /// relay reacts to differently get their own names.
    pub fn category(&self) -> &'static str {
        match self {
            ReplicationError::Connect { .. } => "ConnectFailed",
            ReplicationError::ConnectTimeout { .. } => "ConnectTimeout",
            ReplicationError::Io { .. } => "Io",
            ReplicationError::ConnectionClosed { .. } => "ConnectionClosed",
            ReplicationError::TlsUnsupported { .. } => "TlsUnsupported",
            ReplicationError::TlsConfig { .. } => "TlsConfig",
            ReplicationError::TlsHandshake { .. } => "TlsHandshake",
            ReplicationError::PasswordRequired { .. } => "PasswordRequired",
            ReplicationError::UnsupportedAuth { .. } => "UnsupportedAuth",
            ReplicationError::CleartextPasswordRefused => "CleartextPasswordRefused",
            ReplicationError::AuthProtocol { .. } => "AuthProtocol",
            ReplicationError::Server(_) if self.is_slot_in_use() => "SlotInUse",
            ReplicationError::Server(_) if self.is_slot_missing() => "SlotMissing",
            ReplicationError::Server(_) if self.is_auth_failed() => "AuthFailed",
            ReplicationError::Server(_) => "ServerError",
            ReplicationError::Protocol { .. } => "Protocol",
            ReplicationError::MessageTooLarge { .. } => "MessageTooLarge",
            ReplicationError::InvalidArgument { .. } => "InvalidArgument",
        }
    }

    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::Server(e) => Some(e),
            _ => None,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        self.server_error().map(|e| e.code.as_str())
    }

    /// Another walsender holds the slot (55006 object_in_use while starting):
    /// typically the previous relay's session that the server has not noticed
    /// is dead yet, so retrying later is the fix.
    pub fn is_slot_in_use(&self) -> bool {
        matches!(self.server_error(), Some(e) if e.code == "55006" && e.phase == Phase::StartReplication)
    }

    /// The slot does not exist (42704 undefined_object while starting).
    pub fn is_slot_missing(&self) -> bool {
        matches!(self.server_error(), Some(e) if e.code == "42704" && e.phase == Phase::StartReplication)
    }

    /// Wrong password or no matching `pg_hba.conf` entry: retrying with the
    /// same settings will not help.
    pub fn is_auth_failed(&self) -> bool {
        matches!(self.server_error(), Some(e) if e.code == "28P01" || e.code == "28000")
    }
}

type Result<T, E = ReplicationError> = std::result::Result<T, E>;

/// Result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentification {
    /// Unique per cluster (`initdb`); a change means we are talking to a
    /// different database cluster than before.
    pub system_id: u64,
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlog_pos: Lsn,
    /// Database of a `replication=database` connection.
    pub dbname: Option<String>,
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A chunk of decoded WAL: for pgoutput, exactly one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        server_time: PgTimestamp,
        data: Bytes,
    },
    /// Sent when there is nothing else to send and before the server's
    /// `wal_sender_timeout`. When `reply_requested` is set the caller must
    /// answer soon with [`ReplicationWriter::send_status`] or the server
    /// drops the connection.
    PrimaryKeepalive {
        wal_end: Lsn,
        server_time: PgTimestamp,
        reply_requested: bool,
    },
}

/// A plain or TLS socket, so everything above can be written once.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An authenticated `replication=database` session, before streaming.
pub struct ReplicationConnection {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    parameters: Vec<(String, String)>,
    backend_pid: Option<i32>,
    tls: bool,
}

impl fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("backend_pid", &self.backend_pid)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connects, negotiates TLS, authenticates (trust, password, md5,
    /// SCRAM-SHA-256) and waits until the server is ready for commands.
    pub async fn connect(config: &ReplicationConfig) -> Result<Self> {
        match tokio::time::timeout(config.connect_timeout, Self::connect_inner(config)).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::ConnectTimeout {
                host: config.host.clone(),
                port: config.port,
                after: config.connect_timeout,
            }),
        }
    }

    async fn connect_inner(config: &ReplicationConfig) -> Result<Self> {
        let stream = match open_stream(config).await {
            // libpq's `prefer` also retries in plaintext when the TLS
            // handshake itself fails.
            Err(ReplicationError::TlsHandshake { host, source }) if config.ssl_mode == PgSslMode::Prefer => {
                tracing::debug!(%host, error = %source, "TLS handshake failed, retrying without TLS (sslmode=prefer)");
                Stream::Plain(tcp_connect(config).await?)
            }
            other => other?,
        };
        let tls = matches!(stream, Stream::Tls(_));
        let mut conn = ReplicationConnection {
            stream,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            parameters: Vec::new(),
            backend_pid: None,
            tls,
        };
        conn.startup(config).await?;
        Ok(conn)
    }

    async fn startup(&mut self, config: &ReplicationConfig) -> Result<()> {
        // client_encoding matters beyond queries: pgoutput converts names and
        // text values to it, so UTF8 is what the decoder can rely on.
        // DateStyle ISO makes date/time values unambiguous, and TimeZone UTC gives
        // every timestamptz one offset (the timestamp column's parser takes any).
        let params = [
            ("user", config.user.as_str()),
            ("database", config.dbname.as_str()),
            ("replication", "database"),
            ("application_name", config.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
        ];
        self.wbuf.clear();
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| invalid_argument("startup parameters", e))?;
        self.flush_wbuf("sending the startup message").await?;
        self.authenticate(config).await?;

        loop {
            let (tag, body) = self.read_frame("waiting for the server to be ready").await?;
            match tag {
                b'S' => {
                    let mut fields = body.split(|&b| b == 0);
                    let name = fields.next().map(lossy).unwrap_or_default();
                    let value = fields.next().map(lossy).unwrap_or_default();
                    self.parameters.push((name, value));
                }
                b'K' => {
                    if body.len() >= 4 {
                        self.backend_pid = Some(i32::from_be_bytes([body[0], body[1], body[2], body[3]]));
                    }
                }
                b'N' => log_notice(&body),
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(&body, Phase::Startup)),
                other => return Err(unexpected(other, "waiting for ReadyForQuery")),
            }
        }
    }

    async fn authenticate(&mut self, config: &ReplicationConfig) -> Result<()> {
        let mut scram: Option<ScramSha256> = None;
        let mut scram_verified = false;
        loop {
            let (tag, mut body) = self.read_frame("authenticating").await?;
            match tag {
                b'R' => {}
                b'E' => return Err(server_error(&body, Phase::Startup)),
                b'N' => {
                    log_notice(&body);
                    continue;
                }
                other => return Err(unexpected(other, "authenticating")),
            }
            if body.len() < 4 {
                return Err(protocol("short authentication request"));
            }
            let code = body.get_i32();
            self.wbuf.clear();
            match code {
                0 => {
                    // A server that skips SCRAM's final message would also
                    // skip proving it knows the password; refuse that.
                    if scram.is_some() && !scram_verified {
                        return Err(auth_protocol("server ended SCRAM without its final message"));
                    }
                    return Ok(());
                }
                3 => {
                    crate::postgres::auth::cleartext_allowed(self.tls, config.allow_cleartext_password)
                        .map_err(|_| ReplicationError::CleartextPasswordRefused)?;
                    let password = password(config, "cleartext password")?;
                    frontend::password_message(password.as_bytes(), &mut self.wbuf)
                        .map_err(|e| invalid_argument("password", e))?;
                }
                5 => {
                    if body.len() < 4 {
                        return Err(protocol("short MD5 authentication request"));
                    }
                    let salt = [body[0], body[1], body[2], body[3]];
                    let password = password(config, "md5")?;
                    let hash = md5_hash(config.user.as_bytes(), password.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(|e| invalid_argument("password", e))?;
                }
                10 => {
                    let offered = body.split(|&b| b == 0).any(|m| m == SCRAM_SHA_256.as_bytes());
                    if !offered {
                        let list: Vec<String> = body.split(|&b| b == 0).filter(|m| !m.is_empty()).map(lossy).collect();
                        return Err(ReplicationError::UnsupportedAuth {
                            method: format!("SASL ({})", list.join(", ")),
                        });
                    }
                    let password = password(config, "SCRAM-SHA-256")?;
                    // Channel binding is not offered; plain SCRAM-SHA-256 is
                    // what servers accept unless configured to insist.
                    let state = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, state.message(), &mut self.wbuf)
                        .map_err(|e| invalid_argument("SCRAM message", e))?;
                    scram = Some(state);
                }
                11 => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| auth_protocol("SASL continue without SASL start"))?;
                    state
                        .update(&body)
                        .map_err(|e| auth_protocol(format!("server-first-message: {e}")))?;
                    frontend::sasl_response(state.message(), &mut self.wbuf)
                        .map_err(|e| invalid_argument("SCRAM message", e))?;
                }
                12 => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| auth_protocol("SASL final without SASL start"))?;
                    // Verifies the server's signature: proof that it knows
                    // the password too, not just a relay in the middle.
                    state
                        .finish(&body)
                        .map_err(|e| auth_protocol(format!("server-final-message: {e}")))?;
                    scram_verified = true;
                    continue;
                }
                2 => return Err(unsupported_auth("Kerberos V5")),
                6 => return Err(unsupported_auth("SCM credentials")),
                7 | 8 => return Err(unsupported_auth("GSSAPI")),
                9 => return Err(unsupported_auth("SSPI")),
                other => return Err(unsupported_auth(&format!("code {other}"))),
            }
            self.flush_wbuf("sending authentication data").await?;
        }
    }

    /// A run-time parameter the server reported at startup
    /// (`server_version`, `integer_datetimes`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Process id of our walsender, as in `pg_replication_slots.active_pid`.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Runs one command with the simple query protocol and returns its rows
    /// as text. A server error leaves the connection usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.wbuf.clear();
        frontend::query(sql, &mut self.wbuf).map_err(|e| invalid_argument("query", e))?;
        self.flush_wbuf("sending a query").await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_frame("reading a query result").await?;
            match tag {
                b'D' => rows.push(parse_data_row(body)?),
                b'T' | b'C' | b'I' | b'S' => {}
                b'N' => log_notice(&body),
                // Remember the error but read on to ReadyForQuery so the
                // next command starts on a clean message boundary.
                b'E' => error = Some(server_error(&body, Phase::Query)),
                b'Z' => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                other => return Err(unexpected(other, "reading a query result")),
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentification> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let [row] = rows.as_slice() else {
            return Err(protocol(format!("IDENTIFY_SYSTEM returned {} rows", rows.len())));
        };
        let field = |i: usize, name: &str| -> Result<&str> {
            row.get(i)
                .and_then(|v| v.as_deref())
                .ok_or_else(|| protocol(format!("IDENTIFY_SYSTEM without {name}")))
        };
        let system_id = field(0, "systemid")?;
        let timeline = field(1, "timeline")?;
        let xlog_pos = field(2, "xlogpos")?;
        Ok(SystemIdentification {
            system_id: system_id
                .parse()
                .map_err(|_| protocol(format!("IDENTIFY_SYSTEM systemid {system_id:?}")))?,
            timeline: timeline
                .parse()
                .map_err(|_| protocol(format!("IDENTIFY_SYSTEM timeline {timeline:?}")))?,
            xlog_pos: xlog_pos
                .parse()
                .map_err(|_| protocol(format!("IDENTIFY_SYSTEM xlogpos {xlog_pos:?}")))?,
            dbname: row.get(3).cloned().flatten(),
        })
    }

    /// Starts logical decoding from `slot` at `start` (use [`Lsn::ZERO`] to
    /// resume from the slot's confirmed position). `options` are passed to
    /// the output plugin, e.g.
    /// `[("proto_version", "1"), ("publication_names", &publication_names(&["pub"])?)]`.
    ///
    /// The server then sends everything committed after the slot's
    /// `confirmed_flush_lsn` (or after `start`, if that is later).
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream> {
        let mut sql = format!("START_REPLICATION SLOT {} LOGICAL {start}", quote_identifier(slot)?);
        if !options.is_empty() {
            let rendered = options
                .iter()
                .map(|(k, v)| Ok(format!("{} {}", quote_identifier(k)?, quote_literal(v)?)))
                .collect::<Result<Vec<_>>>()?;
            sql.push_str(" (");
            sql.push_str(&rendered.join(", "));
            sql.push(')');
        }
        self.wbuf.clear();
        frontend::query(&sql, &mut self.wbuf).map_err(|e| invalid_argument("START_REPLICATION", e))?;
        self.flush_wbuf("sending START_REPLICATION").await?;
        loop {
            let (tag, body) = self.read_frame("starting replication").await?;
            match tag {
                b'W' => break,
                b'N' => log_notice(&body),
                b'S' => {}
                b'E' => return Err(server_error(&body, Phase::StartReplication)),
                other => return Err(unexpected(other, "waiting for CopyBothResponse")),
            }
        }
        tracing::debug!(slot, %start, pid = ?self.backend_pid, "logical replication started");
        let (rd, wr) = tokio::io::split(self.stream);
        Ok(ReplicationStream {
            reader: ReplicationReader {
                io: rd,
                // Whatever followed CopyBothResponse in the last read is
                // already stream data.
                buf: self.rbuf,
                done: false,
            },
            writer: ReplicationWriter { io: wr, buf: self.wbuf },
        })
    }

    /// Ends the session politely (Terminate) instead of just dropping it.
    pub async fn close(mut self) -> Result<()> {
        self.wbuf.clear();
        frontend::terminate(&mut self.wbuf);
        self.flush_wbuf("closing").await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }

    async fn flush_wbuf(&mut self, context: &'static str) -> Result<()> {
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|source| ReplicationError::Io { context, source })?;
        self.stream
            .flush()
            .await
            .map_err(|source| ReplicationError::Io { context, source })?;
        self.wbuf.clear();
        Ok(())
    }

    async fn read_frame(&mut self, context: &'static str) -> Result<(u8, Bytes)> {
        loop {
            if let Some(frame) = try_frame(&mut self.rbuf)? {
                return Ok(frame);
            }
            fill(&mut self.stream, &mut self.rbuf, context).await?;
        }
    }
}

/// A session in CopyBoth mode. Use it whole, or [`split`](Self::split) it.
pub struct ReplicationStream {
    reader: ReplicationReader,
    writer: ReplicationWriter,
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("reader", &self.reader)
            .field("writer", &self.writer)
            .finish()
    }
}

impl fmt::Debug for ReplicationReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationReader")
            .field("buffered", &self.buf.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ReplicationWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationWriter").finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// Separates reading from writing, so that WAL can be read in one task
    /// while another confirms positions.
    pub fn split(self) -> (ReplicationReader, ReplicationWriter) {
        (self.reader, self.writer)
    }

    /// See [`ReplicationReader::next`].
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>> {
        self.reader.next().await
    }

    /// See [`ReplicationWriter::send_status`].
    pub async fn send_status(&mut self, write: Lsn, flush: Lsn, apply: Lsn, reply_requested: bool) -> Result<()> {
        self.writer.send_status(write, flush, apply, reply_requested).await
    }
}

/// The reading half of a replication stream.
pub struct ReplicationReader {
    io: ReadHalf<Stream>,
    buf: BytesMut,
    done: bool,
}

impl ReplicationReader {
    /// The next message, or `None` once the server has ended the stream
    /// (CopyDone, e.g. after our own [`ReplicationWriter::finish`]).
    ///
    /// Cancel-safe: it only awaits socket reads into its own buffer, so it
    /// can sit in a `select!` next to a timer or a shutdown signal.
    ///
    /// A connection that closes without CopyDone is an error, not an end:
    /// the server (or the network) went away mid-stream. After any error the
    /// stream should be dropped and a new connection made.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>> {
        if self.done {
            return Ok(None);
        }
        loop {
            while let Some((tag, body)) = try_frame(&mut self.buf)? {
                match tag {
                    b'd' => return parse_copy_data(body).map(Some),
                    b'c' => {
                        self.done = true;
                        return Ok(None);
                    }
                    // The server closes the connection after an error, so
                    // a further call fails with ConnectionClosed.
                    b'E' => return Err(server_error(&body, Phase::Streaming)),
                    b'N' => log_notice(&body),
                    // ParameterStatus can arrive at any time; nothing here
                    // depends on it.
                    b'S' => {}
                    other => return Err(unexpected(other, "streaming")),
                }
            }
            fill(&mut self.io, &mut self.buf, "streaming").await?;
        }
    }
}

/// The writing half of a replication stream.
pub struct ReplicationWriter {
    io: WriteHalf<Stream>,
    buf: BytesMut,
}

impl ReplicationWriter {
    /// Sends a standby status update. `flush` is the promise: the server may
    /// discard WAL before it, and a restarted relay resumes after it. It is
    /// sent exactly as given; keeping it monotonic and honest is the
    /// caller's job. `Lsn::ZERO` means "unknown" and moves nothing.
    ///
    /// `reply_requested` asks the server to answer with a keepalive at once.
    ///
    /// Not cancel-safe: dropping the future halfway can leave a partial
    /// message on the wire, after which the connection must be discarded.
    pub async fn send_status(&mut self, write: Lsn, flush: Lsn, apply: Lsn, reply_requested: bool) -> Result<()> {
        self.buf.clear();
        encode_status(&mut self.buf, write, flush, apply, PgTimestamp::now(), reply_requested);
        self.flush_buf("sending a standby status update").await
    }

    /// Ends the stream from our side (CopyDone). The server answers with its
    /// own CopyDone, which makes [`ReplicationReader::next`] return `None`.
    pub async fn finish(mut self) -> Result<()> {
        self.buf.clear();
        frontend::copy_done(&mut self.buf);
        self.flush_buf("ending the stream").await
    }

    async fn flush_buf(&mut self, context: &'static str) -> Result<()> {
        self.io
            .write_all(&self.buf)
            .await
            .map_err(|source| ReplicationError::Io { context, source })?;
        self.io
            .flush()
            .await
            .map_err(|source| ReplicationError::Io { context, source })
    }
}

/// StandbyStatusUpdate inside a CopyData message.
fn encode_status(buf: &mut BytesMut, write: Lsn, flush: Lsn, apply: Lsn, now: PgTimestamp, reply_requested: bool) {
    buf.put_u8(b'd');
    buf.put_i32(4 + 1 + 8 + 8 + 8 + 8 + 1);
    buf.put_u8(b'r');
    buf.put_u64(write.as_u64());
    buf.put_u64(flush.as_u64());
    buf.put_u64(apply.as_u64());
    buf.put_i64(now.as_micros());
    buf.put_u8(u8::from(reply_requested));
}

/// Quotes an identifier for a replication command (`"a""b"`), refusing NUL.
pub fn quote_identifier(s: &str) -> Result<String> {
    reject_nul("identifier", s).map_err(invalid_name)?;
    Ok(quote_ident(s))
}

/// Quotes a string literal for a replication command, refusing NUL. The
/// replication grammar has no backslash escapes, so only quotes are doubled
/// (see [`quote_replication_literal`]).
pub fn quote_literal(s: &str) -> Result<String> {
    reject_nul("value", s).map_err(invalid_name)?;
    Ok(quote_replication_literal(s))
}

/// The value of pgoutput's `publication_names` option: a comma-separated list
/// of quoted identifiers, so names with capitals or commas survive.
pub fn publication_names(names: &[&str]) -> Result<String> {
    if names.is_empty() {
        return Err(ReplicationError::InvalidArgument {
            reason: "at least one publication is required".to_owned(),
        });
    }
    Ok(names
        .iter()
        .map(|n| quote_identifier(n))
        .collect::<Result<Vec<_>>>()?
        .join(","))
}

async fn tcp_connect(config: &ReplicationConfig) -> Result<TcpStream> {
    let stream = TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(|source| ReplicationError::Connect {
            host: config.host.clone(),
            port: config.port,
            source,
        })?;
    // Status updates are tiny and latency-sensitive; do not let Nagle hold
    // them back.
    stream.set_nodelay(true).map_err(|source| ReplicationError::Io {
        context: "setting TCP_NODELAY",
        source,
    })?;
    set_liveness_options(&stream, config).map_err(|source| ReplicationError::Io {
        context: "setting TCP keepalive and user timeout",
        source,
    })?;
    Ok(stream)
}

/// A dead peer (host gone, network cut, no RST) must not look like a quiet
/// stream. Keepalive probes find an idle dead connection after
/// `time + retries * interval`; `TCP_USER_TIMEOUT` bounds how long sent data
/// (our status updates) may stay unacknowledged. Neither sees a peer whose
/// kernel still acknowledges while the server process is stuck: the session's
/// reply deadline covers that (`super::session`).
fn set_liveness_options(stream: &TcpStream, config: &ReplicationConfig) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let t = &config.tcp;
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(t.keepalive_idle)
            .with_interval(t.keepalive_interval)
            .with_retries(t.keepalive_retries),
    )?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(t.user_timeout))?;
    Ok(())
}

/// TCP settings of the replication socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpLiveness {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_retries: u32,
    pub user_timeout: Duration,
}

impl Default for TcpLiveness {
    /// A dead idle peer is found in about 10 + 3 × 5 = 25 s; unacknowledged
    /// data fails the connection after 30 s.
    fn default() -> Self {
        Self {
            keepalive_idle: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_retries: 3,
            user_timeout: Duration::from_secs(30),
        }
    }
}

async fn open_stream(config: &ReplicationConfig) -> Result<Stream> {
    let mut tcp = tcp_connect(config).await?;
    // Build the TLS config before asking for TLS, so a missing or bad CA
    // fails before we bother the server.
    let tls_config = tls_client_config(config.ssl_mode, config.ca_pem.as_deref()).map_err(tls_config_error)?;
    let Some(tls_config) = tls_config else {
        return Ok(Stream::Plain(tcp));
    };

    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    let io = |source| ReplicationError::Io {
        context: "negotiating TLS",
        source,
    };
    tcp.write_all(&request).await.map_err(io)?;
    // Exactly one byte, read straight from the socket: anything buffered
    // past it would have come before the handshake, unauthenticated.
    let answer = tcp.read_u8().await.map_err(io)?;
    match answer {
        b'S' => {}
        b'N' if config.ssl_mode == PgSslMode::Prefer => return Ok(Stream::Plain(tcp)),
        b'N' => {
            return Err(ReplicationError::TlsUnsupported { mode: config.ssl_mode });
        }
        other => {
            return Err(protocol(format!("unexpected answer {other:#04x} to the TLS request")));
        }
    }
    let server_name = ServerName::try_from(config.host.clone()).map_err(|e| ReplicationError::TlsConfig {
        reason: format!("host {:?} is not a valid TLS server name: {e}", config.host),
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
        .connect(server_name, tcp)
        .await
        .map_err(|source| ReplicationError::TlsHandshake {
            host: config.host.clone(),
            source,
        })?;
    Ok(Stream::Tls(Box::new(tls)))
}

/// [`tls_client_config`] only fails with [`PgError::TlsConfig`].
fn tls_config_error(e: PgError) -> ReplicationError {
    match e {
        PgError::TlsConfig { reason } => ReplicationError::TlsConfig { reason },
        other => ReplicationError::TlsConfig {
            reason: other.to_string(),
        },
    }
}

/// Reads more bytes into `buf`, in large chunks.
async fn fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut, context: &'static str) -> Result<()> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    let n = io
        .read_buf(buf)
        .await
        .map_err(|source| ReplicationError::Io { context, source })?;
    if n == 0 {
        return Err(ReplicationError::ConnectionClosed { context });
    }
    Ok(())
}

/// Takes one complete backend message off the front of `buf`, if there is
/// one: its tag and body. The body shares `buf`'s memory.
fn try_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len < 4 {
        return Err(protocol(format!("message {tag:#04x} with length {len}")));
    }
    if len > MAX_MESSAGE_LEN {
        return Err(ReplicationError::MessageTooLarge {
            len,
            max: MAX_MESSAGE_LEN,
        });
    }
    let total = len + 1;
    if buf.len() < total {
        // Reserve the rest of a large message at once instead of growing
        // the buffer read by read.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some((tag, buf.split_to(len - 4).freeze())))
}

fn parse_copy_data(mut body: Bytes) -> Result<ReplicationMessage> {
    let Some(&kind) = body.first() else {
        return Err(protocol("empty CopyData message"));
    };
    match kind {
        b'w' => {
            if body.len() < 25 {
                return Err(protocol(format!("XLogData header of {} bytes", body.len())));
            }
            body.advance(1);
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let server_time = PgTimestamp(body.get_i64());
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data: body,
            })
        }
        b'k' => {
            if body.len() != 18 {
                return Err(protocol(format!("keepalive of {} bytes", body.len())));
            }
            body.advance(1);
            Ok(ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(body.get_u64()),
                server_time: PgTimestamp(body.get_i64()),
                reply_requested: body.get_u8() != 0,
            })
        }
        other => Err(protocol(format!("unknown CopyData message {other:#04x}"))),
    }
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>> {
    if body.len() < 2 {
        return Err(protocol("short DataRow"));
    }
    let count = body.get_i16();
    let count = usize::try_from(count).map_err(|_| protocol("negative DataRow column count"))?;
    let mut values = Vec::with_capacity(count.min(body.len() / 4));
    for _ in 0..count {
        if body.len() < 4 {
            return Err(protocol("truncated DataRow"));
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(protocol("truncated DataRow value"));
        }
        let value = body.split_to(len);
        let text = String::from_utf8(value.to_vec()).map_err(|_| protocol("DataRow value is not UTF-8"))?;
        values.push(Some(text));
    }
    Ok(values)
}

/// Reads the fields of an ErrorResponse or NoticeResponse.
fn error_fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    body.split(|&b| b == 0)
        .take_while(|field| !field.is_empty())
        .map(|field| (field[0], &field[1..]))
}

fn server_error(body: &[u8], phase: Phase) -> ReplicationError {
    let mut err = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
        phase,
    };
    let mut localized_severity = String::new();
    for (kind, value) in error_fields(body) {
        match kind {
            b'V' => err.severity = lossy(value),
            b'S' => localized_severity = lossy(value),
            b'C' => err.code = lossy(value),
            b'M' => err.message = lossy(value),
            b'D' => err.detail = Some(lossy(value)),
            b'H' => err.hint = Some(lossy(value)),
            _ => {}
        }
    }
    if err.severity.is_empty() {
        err.severity = localized_severity;
    }
    ReplicationError::Server(Box::new(err))
}

fn log_notice(body: &[u8]) {
    let mut severity = String::new();
    let mut code = String::new();
    let mut message = String::new();
    for (kind, value) in error_fields(body) {
        match kind {
            b'V' => severity = lossy(value),
            b'C' => code = lossy(value),
            b'M' => message = lossy(value),
            _ => {}
        }
    }
    if severity == "WARNING" {
        tracing::warn!(%code, %message, "PostgreSQL warning on replication connection");
    } else {
        tracing::debug!(%severity, %code, %message, "PostgreSQL notice on replication connection");
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn password<'a>(config: &'a ReplicationConfig, method: &'static str) -> Result<&'a str> {
    config
        .password
        .as_deref()
        .ok_or(ReplicationError::PasswordRequired { method })
}

fn protocol(reason: impl Into<String>) -> ReplicationError {
    ReplicationError::Protocol { reason: reason.into() }
}

fn auth_protocol(reason: impl Into<String>) -> ReplicationError {
    ReplicationError::AuthProtocol { reason: reason.into() }
}

fn unsupported_auth(method: &str) -> ReplicationError {
    ReplicationError::UnsupportedAuth {
        method: method.to_owned(),
    }
}

fn unexpected(tag: u8, context: &str) -> ReplicationError {
    let shown = if tag.is_ascii_graphic() { tag as char } else { '?' };
    protocol(format!("unexpected message {tag:#04x} ({shown}) while {context}"))
}

fn invalid_name(e: PgError) -> ReplicationError {
    ReplicationError::InvalidArgument { reason: e.to_string() }
}

fn invalid_argument(what: &str, e: io::Error) -> ReplicationError {
    ReplicationError::InvalidArgument {
        reason: format!("{what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_gets_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cfg = ReplicationConfig::new("127.0.0.1", port, "u", "d");
        let stream = tcp_connect(&cfg).await.expect("connect");
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), Duration::from_secs(10));
        assert_eq!(sock.tcp_keepalive_interval().expect("interval"), Duration::from_secs(5));
        assert_eq!(sock.tcp_keepalive_retries().expect("retries"), 3);
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(30))
        );
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_are_split_without_copying() {
        let mut bytes = frame(b'd', b"wxyz");
        bytes.extend(frame(b'c', b""));
        bytes.extend(&frame(b'd', b"partial")[..6]);
        let mut buf = BytesMut::from(&bytes[..]);
        let base = buf.as_ptr();
        let (tag, body) = try_frame(&mut buf).unwrap().unwrap();
        assert_eq!((tag, &body[..]), (b'd', &b"wxyz"[..]));
        assert_eq!(body.as_ptr(), base.wrapping_add(5), "body was copied");
        let (tag, body) = try_frame(&mut buf).unwrap().unwrap();
        assert_eq!((tag, body.len()), (b'c', 0));
        assert!(try_frame(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 6, "partial frame stays buffered");
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert_eq!(try_frame(&mut buf).unwrap_err().category(), "Protocol");
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert_eq!(try_frame(&mut buf).unwrap_err().category(), "MessageTooLarge");
    }

    #[test]
    fn copy_data_kinds() {
        let mut w = vec![b'w'];
        w.extend(0x10u64.to_be_bytes());
        w.extend(0x20u64.to_be_bytes());
        w.extend(5i64.to_be_bytes());
        w.extend(b"BEGIN");
        let msg = parse_copy_data(Bytes::from(w)).unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                server_time: PgTimestamp(5),
                data: Bytes::from_static(b"BEGIN"),
            }
        );

        let mut k = vec![b'k'];
        k.extend(0x30u64.to_be_bytes());
        k.extend(6i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k)).unwrap(),
            ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(0x30),
                server_time: PgTimestamp(6),
                reply_requested: true,
            }
        );

        for bad in [&b""[..], b"w123", b"k", b"x"] {
            let err = parse_copy_data(Bytes::copy_from_slice(bad)).unwrap_err();
            assert_eq!(err.category(), "Protocol");
        }
    }

    #[test]
    fn server_errors_are_classified() {
        let body = |code: &str| {
            let mut v = Vec::new();
            v.extend(b"SERROR\0VERROR\0C");
            v.extend(code.as_bytes());
            v.extend(b"\0Mreplication slot \"s\" is active for PID 42\0\0");
            v
        };
        let in_use = server_error(&body("55006"), Phase::StartReplication);
        assert!(in_use.is_slot_in_use());
        assert!(!in_use.is_slot_missing());
        assert_eq!(in_use.category(), "SlotInUse");
        assert_eq!(in_use.sqlstate(), Some("55006"));
        assert!(in_use.to_string().contains("active for PID 42"), "{in_use}");

        let missing = server_error(&body("42704"), Phase::StartReplication);
        assert!(missing.is_slot_missing());
        assert_eq!(missing.category(), "SlotMissing");
        // The same code while streaming is about something else
        // (a publication), not the slot.
        let later = server_error(&body("42704"), Phase::Streaming);
        assert!(!later.is_slot_missing());
        assert_eq!(later.category(), "ServerError");

        let auth = server_error(b"SFATAL\0C28P01\0Mpassword authentication failed\0\0", Phase::Startup);
        assert!(auth.is_auth_failed());
        assert_eq!(auth.category(), "AuthFailed");
        // Missing or garbled fields never panic.
        let odd = server_error(b"\xff\0C\0", Phase::Query);
        assert_eq!(odd.category(), "ServerError");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_identifier("slot").unwrap(), "\"slot\"");
        assert_eq!(quote_identifier("a\"b").unwrap(), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert_eq!(quote_literal(r"a\b").unwrap(), r"'a\b'");
        assert_eq!(publication_names(&["pub", "My,Pub"]).unwrap(), "\"pub\",\"My,Pub\"");
        assert_eq!(quote_identifier("a\0b").unwrap_err().category(), "InvalidArgument");
        assert_eq!(publication_names(&[]).unwrap_err().category(), "InvalidArgument");
    }

    #[test]
    fn data_rows() {
        let mut body = Vec::new();
        body.extend(3i16.to_be_bytes());
        body.extend(2i32.to_be_bytes());
        body.extend(b"ab");
        body.extend((-1i32).to_be_bytes());
        body.extend(0i32.to_be_bytes());
        assert_eq!(
            parse_data_row(Bytes::from(body)).unwrap(),
            vec![Some("ab".to_owned()), None, Some(String::new())]
        );
        let mut short = Vec::new();
        short.extend(1i16.to_be_bytes());
        short.extend(9i32.to_be_bytes());
        assert!(parse_data_row(Bytes::from(short)).is_err());
    }

    #[test]
    fn debug_hides_the_password() {
        let mut config = ReplicationConfig::new("db", 5432, "u", "d");
        config.password = Some("hunter2".to_owned());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn status_update_layout() {
        let mut buf = BytesMut::new();
        encode_status(&mut buf, Lsn(1), Lsn(2), Lsn(3), PgTimestamp(4), true);
        let mut want = vec![b'd', 0, 0, 0, 38, b'r'];
        for v in [1u64, 2, 3, 4] {
            want.extend(v.to_be_bytes());
        }
        want.push(1);
        assert_eq!(&buf[..], &want[..]);
    }
}
