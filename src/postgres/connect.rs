//! Opening a regular (SQL) connection to PostgreSQL, with libpq's `sslmode` semantics.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use tokio::net::TcpStream;
use tokio_postgres::tls::MakeTlsConnect;

use super::PgError;
use super::auth::{CleartextGuard, is_refusal};
use super::error::{render_chain, render_db_error};
use super::tls::tls_client_config;
use crate::api::{DatabaseSpec, PgSslMode};

/// How long a connection attempt (TCP, TLS and authentication together) may take.
/// Bounded so a black-holed host fails a reconcile quickly instead of hanging it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive idle time. The default of two hours would let a connection to a
/// vanished server look healthy for far too long.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Where and as whom to connect.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PgConnectConfig {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Option<String>,
    pub ssl_mode: PgSslMode,
    /// CA certificate(s), PEM. Required for `VerifyCa`/`VerifyFull`; with `Require`
    /// it upgrades the check to `VerifyCa`, as libpq does when a root certificate exists.
    pub ca_pem: Option<Vec<u8>>,
    /// Shown in `pg_stat_activity`, so a DBA can tell which relay holds a connection.
    pub application_name: String,
    /// Send the password when the server asks for it in clear text over a
    /// connection without TLS (see [`super::auth`]).
    pub allow_cleartext_password: bool,
}

// Hand-written so the password never reaches a log line.
impl fmt::Debug for PgConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnectConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ssl_mode", &self.ssl_mode)
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("<{} bytes>", p.len())))
            .field("application_name", &self.application_name)
            .field("allow_cleartext_password", &self.allow_cleartext_password)
            .finish()
    }
}

impl PgConnectConfig {
    /// Builds the settings from a resource's `spec.database` and the values read
    /// from its Secrets.
    pub fn from_spec(
        spec: &DatabaseSpec,
        user: impl Into<String>,
        password: Option<String>,
        ca_pem: Option<Vec<u8>>,
        application_name: impl Into<String>,
    ) -> Result<Self, PgError> {
        let port = u16::try_from(spec.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| PgError::InvalidConfig {
                reason: format!("port {} is outside 1..=65535", spec.port),
            })?;
        Ok(Self {
            host: spec.host.clone(),
            port,
            dbname: spec.database.clone(),
            user: user.into(),
            password,
            ssl_mode: spec.tls.mode,
            ca_pem,
            application_name: application_name.into(),
            allow_cleartext_password: spec.tls.allow_cleartext_password,
        })
    }

    /// The tokio-postgres settings (without TLS, which [`connect`] adds).
    pub fn to_tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .dbname(&self.dbname)
            .user(&self.user)
            .application_name(&self.application_name)
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .ssl_mode(match self.ssl_mode {
                PgSslMode::Disable => SslMode::Disable,
                PgSslMode::Prefer => SslMode::Prefer,
                // Certificate checks happen in our rustls config; to tokio-postgres
                // all three only mean "TLS or nothing".
                PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull => SslMode::Require,
            });
        if let Some(pw) = &self.password {
            c.password(pw);
        }
        c
    }
}

/// Connects, spawns the connection's I/O task and returns the client.
///
/// Failures are sorted into what a user has to fix: an unreachable server,
/// rejected credentials, a missing database, or TLS trouble.
///
/// The socket is opened here rather than by tokio-postgres so that it runs under a
/// [`CleartextGuard`]: tokio-postgres would answer a cleartext password request on
/// a plaintext connection without asking anyone.
pub async fn connect(cfg: &PgConnectConfig) -> Result<Client, PgError> {
    let pg = cfg.to_tokio_config();
    let tls = tls_client_config(cfg.ssl_mode, cfg.ca_pem.as_deref())?;
    let attempt = async {
        let socket = CleartextGuard::new(tcp_connect(cfg).await?, cfg.allow_cleartext_password);
        match tls {
            None => {
                let (client, conn) = pg.connect_raw(socket, NoTls).await.map_err(Failure::Pg)?;
                spawn_connection(conn);
                Ok(client)
            }
            Some(tls) => {
                let mut make = MakeRustlsConnect::new(tls);
                let tls = <MakeRustlsConnect as MakeTlsConnect<CleartextGuard<TcpStream>>>::make_tls_connect(
                    &mut make, &cfg.host,
                )
                .map_err(|e| {
                    Failure::Early(PgError::TlsConfig {
                        reason: format!("host {:?} is not a valid TLS server name: {e}", cfg.host),
                    })
                })?;
                let (client, conn) = pg.connect_raw(socket, tls).await.map_err(Failure::Pg)?;
                spawn_connection(conn);
                Ok(client)
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(Failure::Early(e))) => Err(e),
        Ok(Err(Failure::Pg(e))) => Err(classify_connect_error(cfg, &e)),
        Err(_) => Err(PgError::DatabaseUnreachable {
            host: cfg.host.clone(),
            port: cfg.port,
            detail: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

enum Failure {
    /// Before tokio-postgres got the socket: already sorted.
    Early(PgError),
    Pg(tokio_postgres::Error),
}

/// TCP with what `tokio_postgres::Config::connect` would set up itself: no Nagle
/// delay, and keepalives so a vanished server is noticed.
async fn tcp_connect(cfg: &PgConnectConfig) -> Result<TcpStream, Failure> {
    let unreachable = |e: std::io::Error| {
        Failure::Early(PgError::DatabaseUnreachable {
            host: cfg.host.clone(),
            port: cfg.port,
            detail: e.to_string(),
        })
    };
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(unreachable)?;
    tcp.set_nodelay(true).map_err(unreachable)?;
    socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE))
        .map_err(unreachable)?;
    Ok(tcp)
}

fn spawn_connection<F>(conn: F)
where
    F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        // The client sees the same failure on its next call; this is only for the log.
        if let Err(e) = conn.await {
            tracing::debug!(error = %render_chain(&e), "PostgreSQL connection closed with an error");
        }
    });
}

fn classify_connect_error(cfg: &PgConnectConfig, e: &tokio_postgres::Error) -> PgError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        return if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            PgError::AuthenticationFailed {
                user: cfg.user.clone(),
                detail: render_db_error(db),
            }
        } else if *code == SqlState::INVALID_CATALOG_NAME {
            PgError::DatabaseNotFound {
                database: cfg.dbname.clone(),
            }
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            PgError::InsufficientPrivilege {
                action: format!("connect to database {:?}", cfg.dbname),
                detail: render_db_error(db),
            }
        } else {
            // Starting up, shutting down, too many connections: the server is there
            // but not taking us now, which a later attempt can fix.
            PgError::DatabaseUnreachable {
                host: cfg.host.clone(),
                port: cfg.port,
                detail: render_db_error(db),
            }
        };
    }
    if is_refusal(e) {
        return PgError::CleartextPasswordRefused {
            host: cfg.host.clone(),
            port: cfg.port,
        };
    }
    let detail = render_chain(e);
    // tokio-postgres does not expose its error kinds; its fixed Display texts for
    // them ("error performing TLS handshake", "authentication error", "invalid
    // configuration") are what is left to tell them apart. A rustls error anywhere
    // in the chain is TLS as well.
    let top = e.to_string();
    if top.starts_with("invalid configuration") {
        return if detail.contains("password missing") {
            PgError::AuthenticationFailed {
                user: cfg.user.clone(),
                detail: "the server asks for a password but none is configured".into(),
            }
        } else {
            PgError::InvalidConfig { reason: detail }
        };
    }
    if top.starts_with("error performing TLS handshake") || has_cause::<rustls::Error>(e) {
        PgError::TlsHandshake {
            host: cfg.host.clone(),
            port: cfg.port,
            detail,
        }
    } else if top.starts_with("authentication error") {
        PgError::AuthenticationFailed {
            user: cfg.user.clone(),
            detail,
        }
    } else {
        PgError::DatabaseUnreachable {
            host: cfg.host.clone(),
            port: cfg.port,
            detail,
        }
    }
}

fn has_cause<T: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = err.source();
    while let Some(e) = cur {
        if e.is::<T>() {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CredentialsSecretRef, PgTlsSpec};

    fn spec(port: i32) -> DatabaseSpec {
        DatabaseSpec {
            host: "db.example".into(),
            port,
            database: "app".into(),
            tls: PgTlsSpec::default(),
            credentials_secret_ref: CredentialsSecretRef {
                name: "s".into(),
                username_key: "username".into(),
                password_key: "password".into(),
            },
        }
    }

    #[test]
    fn from_spec_checks_port() {
        let ok = PgConnectConfig::from_spec(&spec(5432), "u", Some("p".into()), None, "relay").unwrap();
        assert_eq!(ok.port, 5432);
        assert_eq!(ok.ssl_mode, PgSslMode::Prefer);
        for bad in [0, -1, 65536] {
            let e = PgConnectConfig::from_spec(&spec(bad), "u", None, None, "relay").unwrap_err();
            assert_eq!(e.category(), "InvalidSpec");
        }
    }

    #[test]
    fn debug_hides_password() {
        let c = PgConnectConfig::from_spec(&spec(5432), "u", Some("hunter2".into()), None, "relay").unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("redacted"));
    }
}
