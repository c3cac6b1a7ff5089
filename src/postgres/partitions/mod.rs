//! Time partitions of the outbox table (`spec.outbox.partitions`): the one place
//! that creates, detaches and drops them.
//!
//! Each pass reads the partitions and the detached tables the operator left
//! behind, asks [`plan::plan`] (pure) what to do given the clock and the slot's
//! confirmed position, and carries that out. Old partitions leave by DROP of a
//! whole detached table, never by row-by-row DELETE, and only once the slot
//! confirmed every event in them (see [`plan`] for the rule).
//!
//! The WAL position recorded after a detach lives in the detached table's comment
//! (`outbox.dev/detached-from <table> lsn=<lsn>`): it survives an operator restart
//! or a lost status, and a DBA sees why the table is still there.

pub mod plan;

use k8s_openapi::jiff::Timestamp;
use tokio_postgres::Client;

use super::PgError;
use super::error::{col, query_error};
use super::ident::{QualifiedTable, quote_ident, quote_literal};
use crate::api::partitions::{PartitionInterval, PartitionsSpec, PartitionsStatus, RetiringPartition, parse_retention};
use crate::relay::lsn::Lsn;
pub use plan::{Partition, Plan, Policy, SlotFacts, State, Step, Waiting};

/// Rows dated this far past a range's end still find their partition attached.
pub const GRACE_SECONDS: i64 = 300;
/// A detach needs an exclusive lock on the table for a moment; it gives up rather
/// than queue the application's inserts behind it for long.
const LOCK_TIMEOUT: &str = "5s";
const MARKER: &str = "outbox.dev/detached-from";

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error(
        "table {table} is not partitioned BY RANGE on the timestamptz column {column:?}; spec.outbox.partitions needs that ({detail})"
    )]
    NotRangePartitioned {
        table: String,
        column: String,
        detail: String,
    },
    #[error(
        "role {role:?} does not own table {table}: creating and detaching partitions needs the table's owner (or a member of its owning role)"
    )]
    NotTableOwner { table: String, role: String },
    #[error("{0}")]
    Database(#[from] PgError),
}

impl PartitionError {
    /// Stable category: status, metric label and Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            PartitionError::NotRangePartitioned { .. } => "PartitionSpecMismatch",
            PartitionError::NotTableOwner { .. } => "PartitionPrivilege",
            PartitionError::Database(_) => "PartitionMaintenanceFailed",
        }
    }
}

/// What one pass did and what is left waiting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub attached: usize,
    /// Partitions past retention kept (see [`plan`] rule 5), and detached ones
    /// waiting to be dropped.
    pub created: Vec<String>,
    pub detached: Vec<String>,
    pub dropped: Vec<String>,
    pub waiting: Vec<Waiting>,
}

impl Report {
    pub fn to_status(&self) -> PartitionsStatus {
        PartitionsStatus {
            attached: self.attached as u32,
            retiring: self
                .waiting
                .iter()
                .map(|w| RetiringPartition {
                    name: w.name.clone(),
                    detached_at_lsn: w.detached_at.map(|l| l.to_string()),
                    reason: w.reason.clone(),
                })
                .collect(),
            error: None,
        }
    }
}

/// The policy `spec` asks for, in seconds.
pub fn policy(spec: &PartitionsSpec) -> Policy {
    Policy {
        interval: spec.interval.seconds(),
        premake: spec.premake,
        // Never less than one interval: the schema's pattern allows `0m`.
        retention: parse_retention(&spec.retention)
            .unwrap_or(i64::MAX / 4)
            .max(spec.interval.seconds()),
        grace: GRACE_SECONDS,
    }
}

/// One pass: read, [`plan::plan`], carry out. `slot` is what the relay's slot
/// says; `now` is seconds since 1970.
pub async fn manage(
    client: &Client,
    table: &QualifiedTable,
    spec: &PartitionsSpec,
    slot: SlotFacts,
    now: i64,
) -> Result<Report, PartitionError> {
    check_table(client, table, &spec.column).await?;
    let existing = read(client, table).await?;
    let plan = plan::plan(now, &policy(spec), &existing, slot);
    let mut report = Report {
        attached: existing.iter().filter(|p| p.state == State::Attached).count(),
        waiting: plan.waiting,
        ..Report::default()
    };
    for step in plan.steps {
        match step {
            Step::Create { from, to } => {
                let name = partition_name(table, spec.interval, from);
                create(client, table, &name, from, to).await?;
                report.attached += 1;
                report.created.push(name);
            }
            Step::Detach { name } => {
                let lsn = detach(client, table, &name).await?;
                report.attached = report.attached.saturating_sub(1);
                report.waiting.push(Waiting {
                    name: name.clone(),
                    detached_at: Some(lsn),
                    reason: format!("detached; dropped once the slot confirmed {lsn}"),
                });
                report.detached.push(name);
            }
            Step::RecordLsn { name } => {
                record_lsn(client, table, &name).await?;
            }
            Step::Drop { name } => {
                let sql = format!("DROP TABLE {}", child(table, &name));
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| query_error("drop a relayed partition", e))?;
                report.dropped.push(name);
            }
        }
    }
    Ok(report)
}

/// `<table>_p<YYYYMMDDHH>` (hourly) or `<table>_p<YYYYMMDD>` (daily), in UTC, the
/// table's part cut so the whole stays within 63 bytes.
pub fn partition_name(table: &QualifiedTable, interval: PartitionInterval, from: i64) -> String {
    let fmt = match interval {
        PartitionInterval::Hourly => "%Y%m%d%H",
        PartitionInterval::Daily => "%Y%m%d",
    };
    let ts = Timestamp::from_second(from).unwrap_or_default();
    let suffix = format!("_p{}", ts.strftime(fmt));
    let mut base = table.name.clone();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    format!("{base}{suffix}")
}

fn child(table: &QualifiedTable, name: &str) -> String {
    format!("{}.{}", quote_ident(&table.schema), quote_ident(name))
}

fn literal_time(secs: i64) -> String {
    quote_literal(&Timestamp::from_second(secs).unwrap_or_default().to_string())
}

async fn check_table(client: &Client, table: &QualifiedTable, column: &str) -> Result<(), PartitionError> {
    let action = "read the outbox table's partitioning";
    let row = client
        .query_opt(
            "SELECT pt.partstrat::text, pt.partnatts::int4,
                    (SELECT a.attname::text FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum = pt.partattrs[0]),
                    (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum = pt.partattrs[0]),
                    pg_has_role(c.relowner, 'USAGE'), current_user::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    let Some(row) = row else {
        return Err(PgError::TableNotFound {
            table: table.unquoted(),
        }
        .into());
    };
    let strategy: Option<String> = col(&row, 0, action)?;
    let natts: Option<i32> = col(&row, 1, action)?;
    let key: Option<String> = col(&row, 2, action)?;
    let key_type: Option<String> = col(&row, 3, action)?;
    let owner: bool = col(&row, 4, action)?;
    let role: String = col(&row, 5, action)?;
    let mismatch = |detail: String| PartitionError::NotRangePartitioned {
        table: table.unquoted(),
        column: column.to_string(),
        detail,
    };
    match (strategy.as_deref(), natts, key.as_deref(), key_type.as_deref()) {
        (None, ..) => return Err(mismatch("it is not partitioned".into())),
        (Some("r"), Some(1), Some(k), Some("timestamp with time zone")) if k == column => {}
        (Some(s), n, k, t) => {
            return Err(mismatch(format!(
                "its partition key is strategy {s:?} on {} column(s), first {:?} of type {:?}",
                n.unwrap_or(0),
                k.unwrap_or(""),
                t.unwrap_or("")
            )));
        }
    }
    if !owner {
        return Err(PartitionError::NotTableOwner {
            table: table.unquoted(),
            role,
        });
    }
    Ok(())
}

/// The attached partitions with their bounds, and the detached tables this table
/// left behind with their recorded positions. A DEFAULT partition is left out (it
/// has no range; it is never retired); MINVALUE/MAXVALUE bounds read as the ends
/// of time.
pub async fn read(client: &Client, table: &QualifiedTable) -> Result<Vec<Partition>, PgError> {
    let action = "read the outbox table's partitions";
    // The bound expression prints its timestamps in the session's time zone and
    // style; casting them back in the same session reads them exactly.
    let rows = client
        .query(
            "SELECT c.relname::text,
                    extract(epoch FROM substring(b FROM 'FROM \\(''([^'']*)''\\)')::timestamptz)::int8,
                    extract(epoch FROM substring(b FROM 'TO \\(''([^'']*)''\\)')::timestamptz)::int8
             FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             CROSS JOIN LATERAL pg_get_expr(c.relpartbound, c.oid) AS b
             WHERE i.inhparent = (SELECT c2.oid FROM pg_class c2 JOIN pg_namespace n ON n.oid = c2.relnamespace
                                  WHERE n.nspname = $1 AND c2.relname = $2)
               AND b <> 'DEFAULT'",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let from: Option<i64> = col(r, 1, action)?;
        let to: Option<i64> = col(r, 2, action)?;
        out.push(Partition {
            name: col(r, 0, action)?,
            from: from.unwrap_or(i64::MIN),
            to: to.unwrap_or(i64::MAX),
            state: State::Attached,
        });
    }
    let rows = client
        .query(
            "SELECT c.relname::text, obj_description(c.oid, 'pg_class')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind = 'r' AND NOT c.relispartition
               AND obj_description(c.oid, 'pg_class') LIKE $2",
            &[&table.schema, &format!("{MARKER} {}%", table.unquoted())],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    for r in &rows {
        let comment: Option<String> = col(r, 1, action)?;
        let Some(lsn) = comment.as_deref().and_then(|c| parse_marker(c, table)) else {
            continue;
        };
        out.push(Partition {
            name: col(r, 0, action)?,
            from: 0,
            to: 0,
            state: State::Detached { lsn },
        });
    }
    Ok(out)
}

fn marker(table: &QualifiedTable, lsn: Option<Lsn>) -> String {
    match lsn {
        Some(l) => format!("{MARKER} {} lsn={l}", table.unquoted()),
        None => format!("{MARKER} {}", table.unquoted()),
    }
}

/// `Some(None)`: ours, no position yet; `Some(Some(lsn))`: ours, recorded; `None`:
/// another table's, or not ours at all.
fn parse_marker(comment: &str, table: &QualifiedTable) -> Option<Option<Lsn>> {
    let rest = comment.strip_prefix(MARKER)?.strip_prefix(' ')?;
    let rest = rest.strip_prefix(table.unquoted().as_str())?;
    if rest.is_empty() {
        return Some(None);
    }
    let lsn = rest.strip_prefix(" lsn=")?.parse().ok()?;
    Some(Some(lsn))
}

async fn create(client: &Client, table: &QualifiedTable, name: &str, from: i64, to: i64) -> Result<(), PgError> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {table} FOR VALUES FROM ({}) TO ({})",
        child(table, name),
        literal_time(from),
        literal_time(to)
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| query_error("create an upcoming partition", e))
}

/// Detaches `name` and marks it in the same transaction, then records the WAL
/// position after that commit. The detach waits for every transaction writing into
/// the partition, so each of its rows committed before the position recorded.
async fn detach(client: &Client, table: &QualifiedTable, name: &str) -> Result<Lsn, PgError> {
    let sql = format!(
        "BEGIN;
         SET LOCAL lock_timeout = {};
         ALTER TABLE {table} DETACH PARTITION {part};
         COMMENT ON TABLE {part} IS {};
         COMMIT;",
        quote_literal(LOCK_TIMEOUT),
        quote_literal(&marker(table, None)),
        part = child(table, name),
    );
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(query_error("detach a retired partition", e));
    }
    record_lsn(client, table, name).await
}

/// Records the current WAL insert position on a detached table. The insert
/// position (not the write position, which may trail it under asynchronous
/// commit) is past the detach's own commit record.
async fn record_lsn(client: &Client, table: &QualifiedTable, name: &str) -> Result<Lsn, PgError> {
    let action = "record the position after a detach";
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| query_error(action, e))?;
    let text: String = col(&row, 0, action)?;
    let lsn: Lsn = text.parse().map_err(|_| PgError::Query {
        action,
        code: None,
        detail: format!("unreadable position {text:?}"),
    })?;
    let sql = format!(
        "COMMENT ON TABLE {} IS {}",
        child(table, name),
        quote_literal(&marker(table, Some(lsn)))
    );
    client.batch_execute(&sql).await.map_err(|e| query_error(action, e))?;
    Ok(lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox() -> QualifiedTable {
        QualifiedTable {
            schema: "public".into(),
            name: "outbox".into(),
        }
    }

    #[test]
    fn names_follow_the_interval_and_fit_identifiers() {
        assert_eq!(
            partition_name(&outbox(), PartitionInterval::Hourly, 1_893_456_000 + 3 * 3_600),
            "outbox_p2030010103"
        );
        assert_eq!(
            partition_name(&outbox(), PartitionInterval::Daily, 1_893_456_000),
            "outbox_p20300101"
        );
        let long = QualifiedTable {
            schema: "s".into(),
            name: "x".repeat(63),
        };
        assert_eq!(partition_name(&long, PartitionInterval::Daily, 0).len(), 63);
    }

    #[test]
    fn markers_round_trip_and_name_their_table() {
        let t = outbox();
        assert_eq!(parse_marker(&marker(&t, None), &t), Some(None));
        let lsn = Lsn::new(0x1_0000_5000);
        assert_eq!(parse_marker(&marker(&t, Some(lsn)), &t), Some(Some(lsn)));
        let other = QualifiedTable {
            schema: "public".into(),
            name: "outbox2".into(),
        };
        assert_eq!(parse_marker(&marker(&other, Some(lsn)), &t), None);
        assert_eq!(parse_marker("a DBA's note", &t), None);
        assert_eq!(parse_marker(&format!("{MARKER} public.outbox lsn=junk"), &t), None);
    }

    #[test]
    fn retention_is_at_least_one_interval() {
        let spec = PartitionsSpec {
            column: "created_at".into(),
            interval: PartitionInterval::Hourly,
            premake: 2,
            retention: "0m".into(),
        };
        assert_eq!(policy(&spec).retention, 3_600);
    }
}
