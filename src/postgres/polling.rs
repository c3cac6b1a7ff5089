//! `mode: Polling`, what the operator provisions instead of a slot: checks of the
//! table, the order column and the privileges the poller needs, the unique index
//! on the order column (created when missing), and the backlog for the status.
//! No `wal_level`, no REPLICATION attribute: that is the point of the mode.

use tokio_postgres::Client;

use super::error::{col, query_error};
use super::ident::quote_ident;
use super::provision::check_table;
use super::{PgError, QualifiedTable};
use crate::api::ColumnMapping;

/// Backlog counts stop here: counting a huge table on every reconcile would cost
/// more than the number is worth ("more than 100 000 rows wait").
pub const BACKLOG_CAP: i64 = 100_000;

/// What provisioning found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollFacts {
    /// Rows in the table (the events not relayed yet), counted up to [`BACKLOG_CAP`] + 1.
    pub pending_rows: i64,
    /// The index this pass created, if it had to.
    pub index_created: Option<String>,
}

/// Integer types an order column may have (int2, int4, int8).
const INTEGER_TYPES: [u32; 3] = [21, 23, 20];

/// Checks the table, its columns and the role's rights, and makes sure a unique
/// index on the order column exists.
pub async fn provision(
    client: &Client,
    table: &QualifiedTable,
    columns: &ColumnMapping,
    order_column: &str,
) -> Result<PollFacts, PgError> {
    check_table(client, table, columns).await?;
    let action = "check the polling prerequisites";
    let row = client
        .query_opt(
            "SELECT a.atttypid::int8,
                    has_table_privilege(c.oid, 'SELECT'),
                    has_table_privilege(c.oid, 'UPDATE'),
                    has_table_privilege(c.oid, 'DELETE'),
                    EXISTS (SELECT 1 FROM pg_index i
                            WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
                              AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum AND i.indpred IS NULL),
                    current_user::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 AND NOT a.attisdropped
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name, &order_column],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    let Some(row) = row else {
        return Err(PgError::ColumnNotFound {
            table: table.unquoted(),
            column: order_column.to_string(),
            field: "polling.orderColumn",
        });
    };
    let type_oid: i64 = col(&row, 0, action)?;
    let (select, update, delete): (bool, bool, bool) =
        (col(&row, 1, action)?, col(&row, 2, action)?, col(&row, 3, action)?);
    let indexed: bool = col(&row, 4, action)?;
    let user: String = col(&row, 5, action)?;
    if !INTEGER_TYPES.contains(&(type_oid as u32)) {
        return Err(PgError::UnsupportedColumnType {
            table: table.unquoted(),
            column: order_column.to_string(),
            field: "polling.orderColumn",
            reason: "the poller orders rows by it and needs an integer type (a bigserial or identity column)".into(),
        });
    }
    if let Some(missing) = missing_rights(select, update, delete) {
        return Err(PgError::InsufficientPrivilege {
            action: format!("poll {}", table.unquoted()),
            detail: format!(
                "role {user:?} needs {missing} on the table (GRANT SELECT, UPDATE, DELETE ON {table} TO {}): it reads \
                 rows, locks them (FOR UPDATE) and deletes them once Kafka acknowledged them",
                quote_ident(&user)
            ),
        });
    }
    let index_created = if indexed {
        None
    } else {
        let name = index_name(table, order_column);
        let ddl = format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {table} ({})",
            quote_ident(&name),
            quote_ident(order_column)
        );
        client
            .batch_execute(&ddl)
            .await
            .map_err(|e| match query_error("create the poller's index", e) {
                PgError::InsufficientPrivilege { action, detail } => PgError::InsufficientPrivilege {
                    action,
                    detail: format!("{detail}; only the table's owner can create it: run {ddl} as the owner"),
                },
                other => other,
            })?;
        Some(name)
    };
    let pending_rows: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT {}) AS pending",
                BACKLOG_CAP + 1
            ),
            &[],
        )
        .await
        .map_err(|e| query_error("count the rows waiting in the outbox table", e))
        .and_then(|r| col(&r, 0, "count the rows waiting in the outbox table"))?;
    Ok(PollFacts {
        pending_rows,
        index_created,
    })
}

/// The rights the poller lacks, in words, or `None`.
fn missing_rights(select: bool, update: bool, delete: bool) -> Option<String> {
    let missing: Vec<&str> = [(select, "SELECT"), (update, "UPDATE"), (delete, "DELETE")]
        .into_iter()
        .filter(|(has, _)| !has)
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

/// `<table>_<column>_poll`, cut to PostgreSQL's 63-byte names.
pub fn index_name(table: &QualifiedTable, column: &str) -> String {
    let mut name = format!("{}_{}_poll", table.name, column);
    while name.len() > 63 {
        name.remove(0);
    }
    name
}

/// The backlog in words, for the status.
pub fn backlog_words(pending: i64) -> String {
    match pending {
        0 => "no row waits".to_string(),
        1 => "1 row waits".to_string(),
        n if n > BACKLOG_CAP => format!("more than {BACKLOG_CAP} rows wait"),
        n => format!("{n} rows wait"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rights_are_named() {
        assert_eq!(missing_rights(true, true, true), None);
        assert_eq!(missing_rights(true, false, true).as_deref(), Some("UPDATE"));
        assert_eq!(missing_rights(false, true, false).as_deref(), Some("SELECT and DELETE"));
    }

    #[test]
    fn index_names_fit_postgres_identifiers() {
        let t = QualifiedTable::parse("public.outbox").unwrap();
        assert_eq!(index_name(&t, "seq"), "outbox_seq_poll");
        let long = QualifiedTable::parse(&format!("public.{}", "t".repeat(60))).unwrap();
        let n = index_name(&long, "seq");
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("_seq_poll"));
    }

    #[test]
    fn backlog_reads_as_a_sentence() {
        assert_eq!(backlog_words(0), "no row waits");
        assert_eq!(backlog_words(1), "1 row waits");
        assert_eq!(backlog_words(42), "42 rows wait");
        assert_eq!(backlog_words(BACKLOG_CAP + 1), "more than 100000 rows wait");
    }
}
