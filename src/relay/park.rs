//! The park table: where an event that was not delivered whole to its topic is
//! kept, in the outbox's own database, so no policy destroys its only copy.
//!
//! The worker writes a parked event synchronously, before the delivery core lets
//! the position past the event be confirmed (a park is pending like a record).
//! After a crash between the write and the confirmation the event is parked
//! again; the unique key (relay, commit LSN, event id) makes that a no-op.
//!
//! The table is created by the worker the first time it parks something
//! (`CREATE TABLE IF NOT EXISTS`), in the outbox table's schema, named
//! `<outbox table>_parked`; a tableless relay (`source: Messages`) has no table and
//! uses the emit function's schema and `<slot name>_parked` (the relay config hands
//! that over as the "table"). A role without CREATE on that schema fails the park
//! (and so stops the relay, confirming nothing past the event) with a message
//! saying so; a DBA can create the table beforehand with [`ddl`].

use tokio_postgres::Client;
use tracing::warn;

use super::core::ParkedEvent;
use crate::postgres::error::query_error;
use crate::postgres::ident::quote_ident;
use crate::postgres::{PgConnectConfig, PgError, QualifiedTable, connect};

/// The park table for an outbox table: same schema, `<name>_parked` (cut to
/// PostgreSQL's 63-byte identifiers; several relays may share it, rows carry
/// the relay's name).
pub fn park_table_for(outbox: &QualifiedTable) -> QualifiedTable {
    const SUFFIX: &str = "_parked";
    let mut name = outbox.name.clone();
    while name.len() + SUFFIX.len() > 63 {
        name.pop();
    }
    QualifiedTable {
        schema: outbox.schema.clone(),
        name: format!("{name}{SUFFIX}"),
    }
}

/// The table's definition. `payload` holds exactly the bytes the Kafka record
/// would have carried (bytea columns decoded, json as its text); `row_data`, for
/// rows the mapping refused, every column's text form.
pub fn ddl(park: &QualifiedTable) -> String {
    let unique = quote_ident(&format!("{}_key", park.name.trim_end_matches("_parked")));
    format!(
        "CREATE TABLE IF NOT EXISTS {park} (
  relay        text        NOT NULL,
  event_id     text,
  commit_lsn   pg_lsn      NOT NULL,
  reason       text        NOT NULL,
  message      text        NOT NULL,
  skipped      boolean     NOT NULL DEFAULT false,
  topic        text,
  record_key   bytea,
  event_type   text,
  payload      bytea,
  headers      jsonb       NOT NULL DEFAULT '{{}}',
  row_data     jsonb,
  parked_at    timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT {unique} UNIQUE (relay, commit_lsn, event_id)
)"
    )
}

/// Writes parked events over its own SQL connection (opened on first use).
pub struct Parker {
    sql: PgConnectConfig,
    park: QualifiedTable,
    relay: String,
    conn: Option<Client>,
}

impl Parker {
    pub fn new(sql: PgConnectConfig, outbox: &QualifiedTable, relay: String) -> Self {
        Self {
            sql,
            park: park_table_for(outbox),
            relay,
            conn: None,
        }
    }

    /// Drops the connection (after a failure or a timeout); the next park reconnects.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    pub fn table(&self) -> &QualifiedTable {
        &self.park
    }

    /// Durably stores one event; returns only once the row is committed.
    pub async fn park(&mut self, ev: &ParkedEvent) -> Result<(), PgError> {
        let result = self.try_park(ev).await;
        if result.is_err() {
            // A broken connection is replaced on the next attempt.
            self.conn = None;
        }
        result
    }

    async fn try_park(&mut self, ev: &ParkedEvent) -> Result<(), PgError> {
        if self.conn.is_none() {
            let client = connect(&self.sql).await?;
            client
                .batch_execute(&ddl(&self.park))
                .await
                .map_err(|e| query_error("creating the park table", e))?;
            self.conn = Some(client);
        }
        let Some(client) = self.conn.as_ref() else {
            return Ok(());
        };
        let headers: serde_json::Map<String, serde_json::Value> = ev
            .record
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                )
            })
            .collect();
        let header = |name: &str| {
            ev.record
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let event_id = header(super::core::headers::ID);
        let event_type = header(super::core::headers::TYPE);
        let topic = Some(ev.record.topic.as_str()).filter(|t| !t.is_empty());
        // As text, cast in SQL: tokio-postgres is built without its serde_json feature.
        let headers = serde_json::Value::Object(headers).to_string();
        let row = ev.row.as_ref().map(|r| r.to_string());
        let sql = format!(
            "INSERT INTO {} (relay, event_id, commit_lsn, reason, message, skipped, topic, record_key, \
             event_type, payload, headers, row_data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::text::jsonb, $12::text::jsonb) \
             ON CONFLICT ON CONSTRAINT {} DO NOTHING",
            self.park,
            quote_ident(&format!("{}_key", self.park.name.trim_end_matches("_parked")))
        );
        let n = client
            .execute(
                sql.as_str(),
                &[
                    &self.relay,
                    &event_id,
                    &ev.event.commit_lsn,
                    &ev.kind,
                    &ev.reason,
                    &ev.skipped,
                    &topic,
                    &ev.record.key,
                    &event_type,
                    &ev.record.payload,
                    &headers,
                    &row,
                ],
            )
            .await
            .map_err(|e| query_error("parking an event", e))?;
        if n == 0 {
            warn!(event = %ev.event, "event was parked already (an earlier session parked it and stopped before confirming)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn park_table_sits_next_to_the_outbox() {
        let t = park_table_for(&QualifiedTable::parse("shop.outbox").expect("table"));
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("shop", "outbox_parked"));
        let long = "o".repeat(63);
        let t = park_table_for(&QualifiedTable::parse(&format!("s.{long}")).expect("table"));
        assert_eq!(t.name.len(), 63);
        assert!(t.name.ends_with("_parked"));
    }

    #[test]
    fn ddl_is_idempotent_and_keyed() {
        let d = ddl(&QualifiedTable::parse("public.outbox_parked").expect("table"));
        assert!(
            d.starts_with("CREATE TABLE IF NOT EXISTS \"public\".\"outbox_parked\""),
            "{d}"
        );
        assert!(d.contains("UNIQUE (relay, commit_lsn, event_id)"), "{d}");
    }
}
