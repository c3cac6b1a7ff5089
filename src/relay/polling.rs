//! `mode: Polling`, the pure half: the statements the poller runs, the wait
//! between polls, and turning a polled row into the same `TupleData` a pgoutput
//! insert carries, so the mapping, the envelope and the delivery core are the
//! replication path's, unchanged. The I/O half is `session::poll`.
//!
//! One batch is one SQL transaction:
//! 1. `SELECT … ORDER BY <orderColumn> LIMIT n FOR UPDATE SKIP LOCKED`: committed
//!    rows only (a row is invisible until its writer commits), oldest first;
//! 2. every row goes through the delivery core as a transaction of its own, whose
//!    position is the row's order value, so "confirmed" means "this row and every
//!    row before it in the batch is in Kafka (or parked)";
//! 3. `DELETE` of exactly the confirmed rows (by `tableoid` and `ctid`, stable while
//!    the rows are locked), then `COMMIT`.
//!
//! A crash anywhere before the commit leaves every row of the batch in the table:
//! the next poll sends them again (at-least-once), and nothing is deleted that
//! Kafka did not acknowledge. One worker polls at a time (a session-level advisory
//! lock on the poll connection itself, so losing the connection releases both the
//! lock and the batch's row locks together); the next batch starts only after the
//! last one was deleted, so each key's events leave in order-column order.

use std::time::Duration;

use bytes::Bytes;

use super::lsn::Lsn;
use super::pgoutput::{ColumnValue, Relation, RelationColumn, ReplicaIdentity, TupleData};
use crate::postgres::{QualifiedTable, quote_ident};

/// First half of the advisory lock key (`pg_try_advisory_lock(bigint)`): ASCII
/// "obrp" in the high 32 bits, the table's OID in the low ones, so two relays
/// polling one table exclude each other and relays of other tables never do.
pub const LOCK_CLASS: i64 = 0x6f62_7270;

/// The statements of one relay's poller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollSql {
    /// The batch, every column as text, then `tableoid` and `ctid` as text.
    pub select: String,
    /// `$1` tableoids, `$2` ctids (both `text[]`): delete exactly those rows.
    pub delete: String,
}

impl PollSql {
    /// `$1` the quoted table name, `$2` [`LOCK_CLASS`]: true when this session got the lock.
    pub const LOCK: &str = "SELECT pg_try_advisory_lock(($2::int8 << 32) | ($1::text::regclass::oid::int8))";
    /// `$1` the quoted table name: every column's name and type, in column order.
    pub const COLUMNS: &str = "SELECT a.attname::text, a.atttypid::int8 FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

    pub fn new(table: &QualifiedTable, columns: &[String], order_column: &str, batch: usize) -> Self {
        let list = columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
        Self {
            // SKIP LOCKED: a row another session holds (say an operator's manual
            // UPDATE) is passed over for this batch instead of blocking the relay; it
            // is taken by a later one.
            select: format!(
                "SELECT {list}, tableoid::text, ctid::text FROM {table} ORDER BY {} LIMIT {batch} FOR UPDATE SKIP LOCKED",
                quote_ident(order_column)
            ),
            delete: format!(
                "DELETE FROM {table} AS t USING unnest($1::text[], $2::text[]) AS d(toid, tid) \
                 WHERE t.tableoid = d.toid::oid AND t.ctid = d.tid::tid"
            ),
        }
    }
}

/// The table as a pgoutput Relation, from the catalog's names and types, for the
/// mapping (which reads columns by name and looks at a few types).
pub fn relation(table: &QualifiedTable, columns: Vec<(String, u32)>) -> Relation {
    Relation {
        id: 0,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: ReplicaIdentity::Default,
        columns: columns
            .into_iter()
            .map(|(name, type_oid)| RelationColumn {
                flags: 0,
                name,
                type_oid,
                type_modifier: -1,
            })
            .collect(),
    }
}

/// One polled row: its values in text form (as pgoutput sends them), then where
/// it is, for the delete.
pub fn tuple<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> TupleData {
    TupleData {
        columns: values
            .into_iter()
            .map(|v| match v {
                Some(s) => ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => ColumnValue::Null,
            })
            .collect(),
    }
}

/// A row's order value as the core's position. It must be positive and grow
/// strictly within a batch (the query sorts by it; a unique index keeps it
/// strict): the core confirms a prefix by position, and the delete takes exactly
/// the rows at or below the confirmed one.
pub fn position(value: Option<&str>, previous: Option<Lsn>, column: &str) -> Result<Lsn, String> {
    let v = value.ok_or_else(|| format!("order column {column:?} is NULL"))?;
    let n: i64 = v
        .parse()
        .map_err(|_| format!("order column {column:?} holds {v:?}, not an integer"))?;
    if n <= 0 {
        return Err(format!(
            "order column {column:?} holds {n}; the poller needs positive values (a bigserial or identity column)"
        ));
    }
    let lsn = Lsn::new(n as u64);
    if previous.is_some_and(|p| lsn <= p) {
        return Err(format!(
            "order column {column:?} holds {n} twice; it needs unique values (a unique index on it)"
        ));
    }
    Ok(lsn)
}

/// How long to wait before the next poll, given how many rows the last one got:
/// a full batch means more is waiting (no wait), a partial one means the table
/// was just emptied (the shortest wait), and each empty poll doubles the wait up
/// to the longest, so an idle relay costs the database a query every
/// `max` while a busy one never sleeps.
pub fn next_wait(rows: usize, batch: usize, previous: Duration, min: Duration, max: Duration) -> Duration {
    if rows >= batch {
        Duration::ZERO
    } else if rows > 0 {
        min
    } else {
        (previous * 2).clamp(min, max.max(min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> QualifiedTable {
        QualifiedTable::parse("app.outbox").unwrap()
    }

    #[test]
    fn statements_quote_every_name_and_lock_the_batch() {
        let sql = PollSql::new(&table(), &["id".into(), "Seq".into()], "Seq", 250);
        assert_eq!(
            sql.select,
            "SELECT \"id\", \"Seq\", tableoid::text, ctid::text FROM \"app\".\"outbox\" ORDER BY \"Seq\" LIMIT 250 FOR UPDATE SKIP LOCKED"
        );
        assert!(
            sql.delete.starts_with("DELETE FROM \"app\".\"outbox\" AS t"),
            "{}",
            sql.delete
        );
        assert!(sql.delete.contains("t.tableoid = d.toid::oid AND t.ctid = d.tid::tid"));
    }

    #[test]
    fn positions_must_be_positive_and_strictly_increasing() {
        assert_eq!(position(Some("7"), None, "seq"), Ok(Lsn::new(7)));
        assert_eq!(position(Some("8"), Some(Lsn::new(7)), "seq"), Ok(Lsn::new(8)));
        let dup = position(Some("7"), Some(Lsn::new(7)), "seq").unwrap_err();
        assert!(dup.contains("twice"), "{dup}");
        let back = position(Some("3"), Some(Lsn::new(7)), "seq").unwrap_err();
        assert!(back.contains("unique"), "{back}");
        assert!(position(Some("0"), None, "seq").unwrap_err().contains("positive"));
        assert!(position(Some("-4"), None, "seq").unwrap_err().contains("positive"));
        assert!(position(None, None, "seq").unwrap_err().contains("NULL"));
        assert!(
            position(Some("abc"), None, "seq")
                .unwrap_err()
                .contains("not an integer")
        );
    }

    #[test]
    fn the_wait_adapts_to_what_the_last_poll_found() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(500));
        // Full batch: go again at once, whatever the wait was.
        assert_eq!(next_wait(100, 100, max, min, max), Duration::ZERO);
        // Partial batch: the table was emptied; look again soon.
        assert_eq!(next_wait(3, 100, max, min, max), min);
        // Empty polls double the wait, from min, up to max.
        let mut w = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..8 {
            w = next_wait(0, 100, w, min, max);
            seen.push(w.as_millis());
        }
        assert_eq!(seen, vec![10, 20, 40, 80, 160, 320, 500, 500]);
        // max below min: min wins (the settings are checked, but never loop hot).
        assert_eq!(next_wait(0, 100, Duration::ZERO, min, Duration::from_millis(1)), min);
    }

    #[test]
    fn rows_become_pgoutput_tuples() {
        let t = tuple([Some("a"), None, Some("{\"x\":1}")]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(0).and_then(ColumnValue::as_str), Some("a"));
        assert!(t.get(1).is_some_and(ColumnValue::is_null));
        let r = relation(&table(), vec![("id".into(), 2950), ("payload".into(), 3802)]);
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("app", "outbox"));
        assert_eq!(r.columns[1].type_oid, 3802);
    }
}
