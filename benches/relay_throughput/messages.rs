//! The tableless outbox (`source: Messages`) next to the table: the WAL each way
//! of writing an event adds (insert; insert and the delete `deleteAfterRelay`
//! issues; a `pg_logical_emit_message` through the emit function), and the
//! relay's drain rate over a backlog of messages, measured like the table's.
//!
//! Runs after the other phases: it deletes the outbox rows (that is the delete
//! being measured), and its slot exists only while it runs, so it holds no WAL
//! of theirs.

use std::path::Path;
use std::time::Instant;

use outbox_operator::postgres::{self, messages};
use outbox_operator::relay::config::{Credentials, RelayConfig};
use outbox_testbed::{Kafka, Postgres};

use crate::drain::{Worker, drain_timeout, wait_confirmed};
use crate::setup::{AGGREGATES, Payload, checkpoint, current_lsn, relay_spec, topic_records};
use crate::{Args, DB, Res};

const SLOT: &str = "bench_messages";
const TOPIC: &str = "bench.messages";

/// What the phase measured.
#[derive(Clone, Debug, Default)]
pub struct MessageResults {
    pub insert_wal_per_event: f64,
    pub delete_wal_per_event: f64,
    pub message_wal_per_event: f64,
    pub table_drain_rate: f64,
    pub message_drain_rate: f64,
    pub message_drain_secs: f64,
}

/// Emits `events` messages, `batch` per transaction, with the same payloads and keys
/// as the table's rows.
async fn preload_messages(sql: &tokio_postgres::Client, payload: Payload, events: i64, batch: i64) -> Res<()> {
    let stmt = sql
        .prepare(&format!(
            "SELECT count(public.outbox_emit('Order', 'agg-' || (i % {AGGREGATES}), 'OrderCreated', {})) \
             FROM generate_series($1::int8, $2::int8) AS i",
            payload.sql("i")
        ))
        .await?;
    let mut n = 0;
    while n < events {
        let last = (n + batch).min(events) - 1;
        sql.execute(&stmt, &[&n, &last]).await?;
        n = last + 1;
    }
    Ok(())
}

/// `table_drain_rate`: the table's median relay rate from the rounds, for the table.
#[allow(clippy::too_many_arguments)]
pub async fn messages_phase(
    args: &Args,
    pg: &Postgres,
    kafka: &Kafka,
    sql: &tokio_postgres::Client,
    creds: &Credentials,
    dir: &Path,
    insert_wal_per_event: f64,
    table_drain_rate: f64,
) -> Res<MessageResults> {
    let mut r = MessageResults {
        insert_wal_per_event,
        table_drain_rate,
        ..MessageResults::default()
    };
    // The delete deleteAfterRelay issues, over the rows the rounds relayed.
    checkpoint(sql).await?;
    let rows: i64 = sql.query_one("SELECT count(*) FROM public.outbox", &[]).await?.get(0);
    let lsn = current_lsn(sql).await?;
    sql.batch_execute("DELETE FROM public.outbox").await?;
    r.delete_wal_per_event = (current_lsn(sql).await? - lsn) as f64 / rows.max(1) as f64;

    kafka
        .create_topic_with_config(TOPIC, args.partitions, &[("message.timestamp.type", "LogAppendTime")])
        .await?;
    let mut spec = relay_spec(pg, kafka, &args.compression, SLOT, TOPIC)?;
    spec.outbox = serde_json::from_value(serde_json::json!({"source": "Messages"}))?;
    // A publication of its own: the rounds' default one lists the outbox table.
    spec.replication.publication_name = Some(SLOT.into());
    let cfg = RelayConfig::from_spec("bench", "bench", &spec, creds)?;
    let m = cfg
        .messages
        .clone()
        .ok_or("a messages spec resolves to a message source")?;
    let client = pg.client(DB).await?;
    postgres::check_message_prerequisites(&client, &cfg.slot).await?;
    messages::ensure_publication(&client, &cfg.publication).await?;
    messages::ensure_emit_function(&client, &m.function, &m.prefix).await?;
    postgres::ensure_slot(&client, &cfg.slot).await?;
    checkpoint(sql).await?;

    crate::log(format!("emitting {} messages", args.events));
    let lsn0 = current_lsn(sql).await?;
    preload_messages(sql, args.payload, args.events, args.batch).await?;
    let lsn1 = current_lsn(sql).await?;
    r.message_wal_per_event = (lsn1 - lsn0) as f64 / args.events as f64;
    checkpoint(sql).await?;

    crate::log("draining the messages with the relay worker");
    let t = Instant::now();
    let mut worker = Worker::spawn(&spec, creds, dir)?;
    wait_confirmed(sql, &cfg.slot, lsn1, &mut worker, drain_timeout(args.events), t).await?;
    r.message_drain_secs = t.elapsed().as_secs_f64();
    r.message_drain_rate = args.events as f64 / r.message_drain_secs;
    worker.stop().await;
    let records = topic_records(&kafka.bootstrap(), TOPIC).await?;
    if records < args.events {
        return Err(format!("{TOPIC} holds {records} records, fewer than the {} events", args.events).into());
    }
    sql.execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot]).await?;
    Ok(r)
}

/// The phase's markdown section.
pub fn section(r: &MessageResults) -> String {
    format!(
        "### Table or messages\n\n\
         | way | WAL bytes per event | relay drain (events/s, from process start) |\n\
         |---|---|---|\n\
         | insert | {:.0} | {:.0} |\n\
         | insert + delete (`deleteAfterRelay`) | {:.0} | — |\n\
         | message (`pg_logical_emit_message`) | {:.0} | {:.0} ({:.1} s) |\n",
        r.insert_wal_per_event,
        r.table_drain_rate,
        r.insert_wal_per_event + r.delete_wal_per_event,
        r.message_wal_per_event,
        r.message_drain_rate,
        r.message_drain_secs,
    )
}
