//! The one error type of the PostgreSQL module.
//!
//! Each variant carries enough context to act on without logs (which table, which
//! column, what the server said), because its message ends up in a status condition.
//! The server's errors are rendered into text when the error is built: tokio-postgres
//! shows only "db error" for them, and text keeps the error cheap to clone into status.

use std::error::Error as StdError;

use tokio_postgres::Row;
use tokio_postgres::error::{DbError, SqlState};
use tokio_postgres::types::FromSql;

use crate::api::conditions::reasons;

/// Everything that can go wrong while connecting to PostgreSQL or provisioning the
/// publication and slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidName {
        what: &'static str,
        input: String,
        reason: &'static str,
    },

    #[error("invalid PostgreSQL connection settings: {reason}")]
    InvalidConfig { reason: String },

    #[error("unusable TLS settings for PostgreSQL: {reason}")]
    TlsConfig { reason: String },

    #[error("TLS with PostgreSQL at {host}:{port} failed: {detail}")]
    TlsHandshake { host: String, port: u16, detail: String },

    #[error("cannot reach PostgreSQL at {host}:{port}: {detail}")]
    DatabaseUnreachable { host: String, port: u16, detail: String },

    #[error("PostgreSQL rejected the credentials of user {user:?}: {detail}")]
    AuthenticationFailed { user: String, detail: String },

    #[error(
        "PostgreSQL at {host}:{port} asked for the password in clear text (password authentication) over an \
         unencrypted connection, and it was not sent: use tls.mode Require, VerifyCa or VerifyFull, or have the \
         server ask for scram-sha-256 (pg_hba.conf); only if the network is trusted, set \
         spec.database.tls.allowCleartextPassword: true"
    )]
    CleartextPasswordRefused { host: String, port: u16 },

    #[error("database {database:?} does not exist on the PostgreSQL server")]
    DatabaseNotFound { database: String },

    #[error("lost the PostgreSQL connection while trying to {action}: {detail}")]
    ConnectionLost { action: &'static str, detail: String },

    #[error(
        "the PostgreSQL server is a standby (in recovery); point the relay at the primary, \
         where the logical replication slot has to live"
    )]
    ServerIsStandby,

    #[error("PostgreSQL {version} is not supported; version 13 or later is required (14 or later for source Messages)")]
    UnsupportedServerVersion { version: String },

    #[error(
        "wal_level is {actual:?} but logical replication needs \"logical\": \
         set wal_level = logical (e.g. ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
    )]
    WalLevelNotLogical { actual: String },

    #[error("table {table} does not exist (schema and table names are case-sensitive)")]
    TableNotFound { table: String },

    #[error("{table} is a {kind}, not a table; only tables can be published")]
    NotATable { table: String, kind: &'static str },

    #[error("column {column:?} (spec.outbox.columns.{field}) does not exist in table {table}")]
    ColumnNotFound {
        table: String,
        column: String,
        field: &'static str,
    },

    #[error("column {column:?} of table {table} cannot be used as spec.outbox.columns.{field}: {reason}")]
    UnsupportedColumnType {
        table: String,
        column: String,
        field: &'static str,
        reason: String,
    },

    #[error("insufficient privilege to {action}: {detail}")]
    InsufficientPrivilege { action: String, detail: String },

    #[error(
        "all {max} replication slots (max_replication_slots) are in use; \
         drop an unused slot or raise max_replication_slots and restart PostgreSQL"
    )]
    SlotLimitReached { max: i64, used: i64 },

    #[error("replication slot {slot:?} already exists but cannot be used: {detail}")]
    SlotConflict { slot: String, detail: String },

    #[error(
        "replication slot {slot:?} is still in use{} and could not be freed",
        .pid.map(|p| format!(" by process {p}")).unwrap_or_default()
    )]
    SlotInUse { slot: String, pid: Option<i32> },

    #[error("publication {publication:?} already exists but cannot be used: {detail}")]
    PublicationConflict { publication: String, detail: String },

    #[error("failed to {action}: {detail}")]
    Query {
        action: &'static str,
        /// SQLSTATE, when the server reported the error.
        code: Option<String>,
        detail: String,
    },
}

impl PgError {
    /// Stable CamelCase category, used as condition reason, Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            PgError::InvalidName { .. } | PgError::InvalidConfig { .. } => reasons::INVALID_SPEC,
            PgError::TlsConfig { .. } => "TlsConfigInvalid",
            PgError::TlsHandshake { .. } => "TlsHandshakeFailed",
            PgError::DatabaseUnreachable { .. } | PgError::ConnectionLost { .. } => reasons::DATABASE_UNREACHABLE,
            PgError::AuthenticationFailed { .. } => reasons::AUTHENTICATION_FAILED,
            PgError::CleartextPasswordRefused { .. } => "CleartextPasswordRefused",
            PgError::DatabaseNotFound { .. } => "DatabaseNotFound",
            PgError::ServerIsStandby => "ServerIsStandby",
            PgError::UnsupportedServerVersion { .. } => "UnsupportedServerVersion",
            PgError::WalLevelNotLogical { .. } => reasons::WAL_LEVEL_NOT_LOGICAL,
            PgError::TableNotFound { .. } | PgError::NotATable { .. } => reasons::TABLE_NOT_FOUND,
            PgError::ColumnNotFound { .. } => "ColumnNotFound",
            PgError::UnsupportedColumnType { .. } => "UnsupportedColumnType",
            PgError::InsufficientPrivilege { .. } => reasons::INSUFFICIENT_PRIVILEGE,
            PgError::SlotLimitReached { .. } => "SlotLimitReached",
            PgError::SlotConflict { .. } => "SlotConflict",
            PgError::SlotInUse { .. } => "SlotInUse",
            PgError::PublicationConflict { .. } => "PublicationConflict",
            PgError::Query { .. } => reasons::PROVISIONING_FAILED,
        }
    }

    /// Whether retrying the same call later can succeed without anyone changing
    /// the spec or the database (network trouble, a slot briefly held by a worker).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PgError::DatabaseUnreachable { .. } | PgError::ConnectionLost { .. } | PgError::SlotInUse { .. }
        )
    }
}

/// Renders an error and all its causes on one line.
pub(crate) fn render_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        if let Some(db) = e.downcast_ref::<DbError>() {
            out.push_str(": ");
            out.push_str(&render_db_error(db));
        } else {
            out.push_str(": ");
            out.push_str(&e.to_string());
        }
        cur = e.source();
    }
    out
}

/// The server's message with its DETAIL and HINT, on one line.
pub(crate) fn render_db_error(db: &DbError) -> String {
    let mut out = db.message().to_string();
    if let Some(detail) = db.detail() {
        out.push_str(" (detail: ");
        out.push_str(detail);
        out.push(')');
    }
    if let Some(hint) = db.hint() {
        out.push_str(" (hint: ");
        out.push_str(hint);
        out.push(')');
    }
    out
}

/// Maps a failed statement to an error: a privilege error keeps its own category
/// (the fix is a GRANT, not a retry), a broken connection is reported as such.
pub(crate) fn query_error(action: &'static str, err: tokio_postgres::Error) -> PgError {
    if let Some(db) = err.as_db_error() {
        if *db.code() == SqlState::INSUFFICIENT_PRIVILEGE {
            return PgError::InsufficientPrivilege {
                action: action.to_string(),
                detail: render_db_error(db),
            };
        }
        return PgError::Query {
            action,
            code: Some(db.code().code().to_string()),
            detail: render_db_error(db),
        };
    }
    if err.is_closed() || has_io_cause(&err) {
        return PgError::ConnectionLost {
            action,
            detail: render_chain(&err),
        };
    }
    PgError::Query {
        action,
        code: None,
        detail: render_chain(&err),
    }
}

/// Reads column `idx` of a row. The queries fix every column's type, so a mismatch
/// means a server that is not the PostgreSQL we expect; that must fail the call,
/// not panic the process (which `Row::get` would do).
pub(crate) fn col<'a, T: FromSql<'a>>(row: &'a Row, idx: usize, action: &'static str) -> Result<T, PgError> {
    row.try_get(idx).map_err(|e| PgError::Query {
        action,
        code: None,
        detail: format!("unexpected value in result column {idx}: {}", render_chain(&e)),
    })
}

pub(crate) fn has_io_cause(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = err.source();
    while let Some(e) = cur {
        if e.is::<std::io::Error>() {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_reuse_condition_reasons() {
        let e = PgError::WalLevelNotLogical {
            actual: "replica".into(),
        };
        assert_eq!(e.category(), "WalLevelNotLogical");
        assert!(e.to_string().contains("wal_level = logical"));
        assert!(e.to_string().contains("restart"));
        assert_eq!(PgError::TableNotFound { table: "t".into() }.category(), "TableNotFound");
        assert_eq!(
            PgError::InsufficientPrivilege {
                action: "x".into(),
                detail: "y".into()
            }
            .category(),
            "InsufficientPrivilege"
        );
        assert_eq!(
            PgError::Query {
                action: "x",
                code: None,
                detail: "y".into()
            }
            .category(),
            "ProvisioningFailed"
        );
        assert_eq!(
            PgError::ConnectionLost {
                action: "x",
                detail: "y".into()
            }
            .category(),
            "DatabaseUnreachable"
        );
    }

    #[test]
    fn categories_are_camel_case() {
        let all = [
            PgError::InvalidConfig { reason: String::new() },
            PgError::TlsConfig { reason: String::new() },
            PgError::TlsHandshake {
                host: String::new(),
                port: 0,
                detail: String::new(),
            },
            PgError::DatabaseNotFound {
                database: String::new(),
            },
            PgError::ServerIsStandby,
            PgError::UnsupportedServerVersion { version: String::new() },
            PgError::ColumnNotFound {
                table: String::new(),
                column: String::new(),
                field: "id",
            },
            PgError::SlotLimitReached { max: 1, used: 1 },
            PgError::SlotConflict {
                slot: String::new(),
                detail: String::new(),
            },
            PgError::SlotInUse {
                slot: String::new(),
                pid: Some(1),
            },
            PgError::PublicationConflict {
                publication: String::new(),
                detail: String::new(),
            },
        ];
        for e in all {
            let c = e.category();
            assert!(c.chars().next().is_some_and(|ch| ch.is_ascii_uppercase()), "{c}");
            assert!(c.chars().all(|ch| ch.is_ascii_alphanumeric()), "{c}");
        }
    }
}
