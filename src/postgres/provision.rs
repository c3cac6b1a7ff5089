//! Checks that the server, the role and the outbox table can feed a relay.
//!
//! Read-only and safe to run on each reconcile. Creating and dropping the relay's
//! publication and slot is [`super::objects`]' job, driven by [`super::binding`].

use tokio_postgres::Client;

use super::PgError;
use super::error::{col, query_error};
use super::ident::{QualifiedTable, quote_ident, validate_slot_name};
use crate::api::ColumnMapping;

/// Oldest supported server: `pg_replication_slots.wal_status`/`safe_wal_size` and
/// `publish_via_partition_root` exist from 13 on, and 12 is out of support.
pub const MIN_SERVER_VERSION_NUM: i32 = 130_000;

/// What [`check_prerequisites`] learned about the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prerequisites {
    /// `server_version`, e.g. `16.4 (Debian 16.4-1)`.
    pub server_version: String,
    /// `server_version_num`, e.g. `160004`.
    pub server_version_num: i32,
    /// `pg_current_wal_lsn()` when checked, e.g. `0/1A2B3C8`.
    pub current_wal_lsn: String,
    pub current_user: String,
    pub database: String,
    pub is_superuser: bool,
    /// The table is partitioned (its rows live in partitions).
    pub table_partitioned: bool,
    /// Our slot already exists (it then needs no free slot).
    pub slot_exists: bool,
    pub replication_slots_used: i64,
    pub max_replication_slots: i64,
}

/// Whether the role `r` (a `pg_roles` row) may stream: the REPLICATION attribute,
/// or, on managed services (Amazon RDS/Aurora), membership in the role they grant
/// replication through instead. Shared with `snapshot`, so both read it alike.
pub(super) const REPLICATION_GRANTED: &str = "(r.rolreplication
     OR EXISTS (SELECT 1 FROM pg_roles g
                WHERE g.rolname = 'rds_replication' AND pg_has_role(g.oid, 'MEMBER')))";

/// Types the payload column may have; the relay sends its value as stored.
const PAYLOAD_TYPES: &[&str] = &["json", "jsonb", "text", "varchar", "bytea"];
/// Types the optional headers column may have (a JSON object, possibly stored as text).
const HEADERS_TYPES: &[&str] = &["json", "jsonb", "text", "varchar"];
/// Types the timestamp column may have (`timestamp` is read as UTC).
const TIMESTAMP_TYPES: &[&str] = &["timestamptz", "timestamp"];
/// Types the partition column may have.
const PARTITION_TYPES: &[&str] = &["int2", "int4", "int8"];
/// Types the trace-context columns may have.
const TRACE_TYPES: &[&str] = &["text", "varchar"];

/// Checks that the server, the role and the table can feed the relay.
///
/// In order: a primary of version 13+, `wal_level = logical`, the table and every
/// mapped column exist, the payload and headers columns have usable types, the role
/// may replicate, and a replication slot is free (or `slot_name` already exists).
pub async fn check_prerequisites(
    client: &Client,
    table: &QualifiedTable,
    columns: &ColumnMapping,
    slot_name: &str,
) -> Result<Prerequisites, PgError> {
    check(client, Some((table, columns)), slot_name).await
}

/// The same checks for `source: Messages`: no table to look at, but a server of
/// version 14+ (pgoutput's `messages` option). `gen_random_uuid()`, which the emit
/// function uses, is built in from 13 on.
pub async fn check_message_prerequisites(client: &Client, slot_name: &str) -> Result<Prerequisites, PgError> {
    check(client, None, slot_name).await
}

/// Oldest server whose pgoutput sends logical decoding messages.
pub const MIN_MESSAGES_VERSION_NUM: i32 = 140_000;

async fn check(
    client: &Client,
    table: Option<(&QualifiedTable, &ColumnMapping)>,
    slot_name: &str,
) -> Result<Prerequisites, PgError> {
    validate_slot_name(slot_name)?;
    let action = "read server settings";
    let row = client
        .query_one(
            &format!(
                "SELECT current_setting('server_version'),
                    current_setting('server_version_num')::int4,
                    current_setting('wal_level'),
                    pg_is_in_recovery(),
                    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
                    current_user::text,
                    current_database()::text,
                    r.rolsuper,
                    {REPLICATION_GRANTED},
                    current_setting('max_replication_slots')::int8,
                    (SELECT count(*) FROM pg_replication_slots),
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)
             FROM pg_roles r WHERE r.rolname = current_user"
            ),
            &[&slot_name],
        )
        .await
        .map_err(|e| query_error(action, e))?;

    let server_version: String = col(&row, 0, action)?;
    let server_version_num: i32 = col(&row, 1, action)?;
    let wal_level: String = col(&row, 2, action)?;
    let in_recovery: bool = col(&row, 3, action)?;
    let current_wal_lsn: Option<String> = col(&row, 4, action)?;
    let current_user: String = col(&row, 5, action)?;
    let database: String = col(&row, 6, action)?;
    let is_superuser: bool = col(&row, 7, action)?;
    let can_replicate: bool = col(&row, 8, action)?;
    let max_replication_slots: i64 = col(&row, 9, action)?;
    let replication_slots_used: i64 = col(&row, 10, action)?;
    let slot_exists: bool = col(&row, 11, action)?;

    if in_recovery {
        return Err(PgError::ServerIsStandby);
    }
    let min = if table.is_some() {
        MIN_SERVER_VERSION_NUM
    } else {
        MIN_MESSAGES_VERSION_NUM
    };
    if server_version_num < min {
        return Err(PgError::UnsupportedServerVersion {
            version: server_version,
        });
    }
    if wal_level != "logical" {
        return Err(PgError::WalLevelNotLogical { actual: wal_level });
    }

    let table_partitioned = match table {
        Some((table, columns)) => check_table(client, table, columns).await?,
        None => false,
    };

    if !(is_superuser || can_replicate) {
        return Err(PgError::InsufficientPrivilege {
            action: "stream logical replication".into(),
            detail: format!(
                "role {current_user:?} needs the REPLICATION attribute (ALTER ROLE {} WITH REPLICATION) or superuser",
                quote_ident(&current_user)
            ),
        });
    }
    if !slot_exists && replication_slots_used >= max_replication_slots {
        return Err(PgError::SlotLimitReached {
            max: max_replication_slots,
            used: replication_slots_used,
        });
    }

    Ok(Prerequisites {
        server_version,
        server_version_num,
        current_wal_lsn: current_wal_lsn.unwrap_or_default(),
        current_user,
        database,
        is_superuser,
        table_partitioned,
        slot_exists,
        replication_slots_used,
        max_replication_slots,
    })
}

/// Checks the table and its mapped columns; returns whether it is partitioned.
pub(crate) async fn check_table(
    client: &Client,
    table: &QualifiedTable,
    columns: &ColumnMapping,
) -> Result<bool, PgError> {
    // Exact catalog lookup rather than to_regclass(): names are case-sensitive
    // as written, and a lookup by value needs no quoting.
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relkind::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| query_error("look up the outbox table", e))?;
    let Some(rel) = rel else {
        return Err(PgError::TableNotFound {
            table: table.unquoted(),
        });
    };
    let oid: u32 = col(&rel, 0, "look up the outbox table")?;
    let relkind: String = col(&rel, 1, "look up the outbox table")?;
    let partitioned = match relkind.as_str() {
        "r" => false,
        "p" => true,
        other => {
            return Err(PgError::NotATable {
                table: table.unquoted(),
                kind: relkind_name(other),
            });
        }
    };

    let rows = client
        .query(
            // Domains are resolved to their base type, so a `jsonb`-based domain passes.
            // Generated columns are flagged: pgoutput leaves them out of the stream.
            "SELECT a.attname::text,
                    COALESCE(bt.typname, t.typname)::text,
                    format_type(a.atttypid, a.atttypmod),
                    a.attgenerated <> ''
             FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await
        .map_err(|e| query_error("read the outbox table's columns", e))?;
    struct Col {
        name: String,
        base_type: String,
        shown_type: String,
        generated: bool,
    }
    let action = "read the outbox table's columns";
    let mut cols = Vec::with_capacity(rows.len());
    for r in &rows {
        cols.push(Col {
            name: col(r, 0, action)?,
            base_type: col(r, 1, action)?,
            shown_type: col(r, 2, action)?,
            generated: col(r, 3, action)?,
        });
    }

    let mut mapped: Vec<(&'static str, &str, Option<&[&str]>)> = vec![
        ("id", &columns.id, None),
        ("aggregateType", &columns.aggregate_type, None),
        ("aggregateId", &columns.aggregate_id, None),
        ("eventType", &columns.event_type, None),
        ("payload", &columns.payload, Some(PAYLOAD_TYPES)),
    ];
    if let Some(h) = &columns.headers {
        mapped.push(("headers", h, Some(HEADERS_TYPES)));
    }
    let optional: [(&'static str, &Option<String>, &'static [&'static str]); 4] = [
        ("timestamp", &columns.timestamp, TIMESTAMP_TYPES),
        ("partition", &columns.partition, PARTITION_TYPES),
        ("traceparent", &columns.traceparent, TRACE_TYPES),
        ("tracestate", &columns.tracestate, TRACE_TYPES),
    ];
    for (field, column, allowed) in optional {
        if let Some(c) = column {
            mapped.push((field, c, Some(allowed)));
        }
    }
    // Header columns go out in their text form: any type will do.
    mapped.extend(
        columns
            .header_columns
            .iter()
            .map(|h| ("headerColumns", h.column.as_str(), None)),
    );
    for (field, column, allowed) in mapped {
        let Some(col) = cols.iter().find(|c| c.name == column) else {
            return Err(PgError::ColumnNotFound {
                table: table.unquoted(),
                column: column.to_string(),
                field,
            });
        };
        if col.generated {
            return Err(PgError::UnsupportedColumnType {
                table: table.unquoted(),
                column: column.to_string(),
                field,
                reason: "it is a generated column, and logical replication does not carry generated columns".into(),
            });
        }
        if let Some(allowed) = allowed
            && !allowed.contains(&col.base_type.as_str())
        {
            return Err(PgError::UnsupportedColumnType {
                table: table.unquoted(),
                column: column.to_string(),
                field,
                reason: format!(
                    "its type is {} but must be one of {}",
                    col.shown_type,
                    allowed.join(", ")
                ),
            });
        }
    }
    Ok(partitioned)
}

fn relkind_name(relkind: &str) -> &'static str {
    match relkind {
        "v" => "view",
        "m" => "materialized view",
        "f" => "foreign table",
        "i" | "I" => "index",
        "S" => "sequence",
        "c" => "composite type",
        "t" => "TOAST table",
        _ => "relation of another kind",
    }
}
