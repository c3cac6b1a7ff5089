//! `deleteAfterRelay`: deletes delivered rows from the outbox table.
//!
//! Runs beside the stream on its own SQL connection and only ever sees ids whose
//! transactions Kafka fully acknowledged. It is housekeeping: when a delete fails
//! the row merely stays in the table (the publication sends inserts only, so the
//! delete itself never becomes an event).

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::config::RelayConfig;
use crate::metrics::RelayMetrics;
use crate::postgres::error::query_error;
use crate::postgres::ident::quote_ident;
use crate::postgres::{PgError, connect};

/// Ids per DELETE statement.
const BATCH: usize = 5_000;

pub async fn run(
    cfg: RelayConfig,
    metrics: RelayMetrics,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<(tokio_postgres::Client, String)> = None;
    loop {
        let mut ids = tokio::select! {
            batch = rx.recv() => match batch { Some(b) => b, None => return },
            _ = shutdown.changed() => return,
        };
        while ids.len() < BATCH
            && let Ok(more) = rx.try_recv()
        {
            ids.extend(more);
        }
        let ids: Vec<String> = ids.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
        for attempt in 1..=3 {
            match delete(&cfg, &mut conn, &ids).await {
                Ok(()) => break,
                Err(e) => {
                    conn = None;
                    metrics.error("RetentionFailed");
                    warn!(error = %e, attempt, rows = ids.len(), "deleting relayed rows failed; they stay in the table");
                    tokio::time::sleep(std::time::Duration::from_secs(attempt)).await;
                }
            }
        }
    }
}

async fn delete(
    cfg: &RelayConfig,
    conn: &mut Option<(tokio_postgres::Client, String)>,
    ids: &[String],
) -> Result<(), PgError> {
    if conn.is_none() {
        let client = connect(&cfg.sql).await?;
        // Compare in the id column's own type so its index is used.
        let row = client
            .query_one(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                &[&cfg.table.to_string(), &cfg.columns.id],
            )
            .await
            .map_err(|e| query_error("looking up the id column type", e))?;
        let ty: String = row.get(0);
        let sql = format!(
            "DELETE FROM {} WHERE {} = ANY($1::text[]::{ty}[])",
            cfg.table,
            quote_ident(&cfg.columns.id)
        );
        *conn = Some((client, sql));
    }
    if let Some((client, sql)) = conn.as_ref() {
        for chunk in ids.chunks(BATCH) {
            client
                .execute(sql.as_str(), &[&chunk])
                .await
                .map_err(|e| query_error("deleting relayed rows", e))?;
        }
    }
    Ok(())
}

/// Ends the walsender `pid` if it still holds this relay's slot. Only ever
/// called with the backend of our own previous connection, which went silent:
/// never a live peer (a hot standby must not take the slot from a working
/// worker). A role may end its own backends without extra privileges.
pub async fn end_stale_walsender(cfg: &RelayConfig, pid: i32) -> Result<bool, PgError> {
    let client = connect(&cfg.sql).await?;
    let row = client
        .query_opt(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid = $2",
            &[&cfg.slot, &pid],
        )
        .await
        .map_err(|e| query_error("ending a stale walsender", e))?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}
