//! The relay's own polling mode (`mode: Polling`) next to replication and the
//! naive polling publisher: drain rate over the same backlog (from the worker
//! process's start), the WAL it adds per event (its batched deletes), and the
//! latency two ways: insert → broker append (LogAppendTime) at the bench's
//! offered rate, like the replication relay's latency phase, and the time from a
//! single insert's commit to the row leaving the table on an idle relay (the
//! poller deletes a row only after Kafka acknowledged it, so this bounds commit →
//! acknowledgement from above, with the idle poll interval in it).
//!
//! Runs last, on a table of its own, with no slot involved.

use std::path::Path;
use std::time::{Duration, Instant};

use outbox_operator::api::{PollingSpec, RelayMode};
use outbox_operator::relay::config::Credentials;
use outbox_testbed::{Kafka, OUTBOX_DDL, Postgres};

use crate::drain::{Worker, drain_timeout};
use crate::latency::{offer, read_latencies, unix_micros};
use crate::setup::{
    Payload, checkpoint, current_lsn, insert_sql, partition_offsets, preload, relay_spec, topic_records,
};
use crate::{Args, DB, Res};

const TABLE: &str = "poll_mode_outbox";
const TOPIC: &str = "bench.pollmode";
/// Idle pickups measured, one event at a time.
const PICKUPS: usize = 40;

#[derive(Clone, Debug, Default)]
pub struct PollModeResults {
    pub drain_rate: f64,
    pub drain_secs: f64,
    pub extra_wal_per_event: f64,
    pub worker_cpu_secs: f64,
    pub pickup_p50_ms: f64,
    pub pickup_p99_ms: f64,
    /// At the offered rate: events measured, insert → append p50 and p99.
    pub offered: u64,
    pub append_p50_ms: f64,
    pub append_p99_ms: f64,
}

async fn rows(sql: &tokio_postgres::Client) -> Res<i64> {
    Ok(sql
        .query_one(&format!("SELECT count(*) FROM public.{TABLE}"), &[])
        .await?
        .get(0))
}

pub async fn poll_mode_phase(
    args: &Args,
    pg: &Postgres,
    kafka: &Kafka,
    sql: &tokio_postgres::Client,
    creds: &Credentials,
    dir: &Path,
) -> Res<PollModeResults> {
    let mut r = PollModeResults::default();
    sql.batch_execute(&OUTBOX_DDL.replace("public.outbox", &format!("public.{TABLE}")))
        .await?;
    sql.batch_execute(&format!(
        "ALTER TABLE public.{TABLE} ADD COLUMN seq bigserial; CREATE UNIQUE INDEX ON public.{TABLE} (seq)"
    ))
    .await?;
    kafka
        .create_topic_with_config(TOPIC, args.partitions, &[("message.timestamp.type", "LogAppendTime")])
        .await?;
    preload(sql, args.payload, &format!("public.{TABLE}"), args.events, args.batch).await?;
    checkpoint(sql).await?;

    let mut spec = relay_spec(pg, kafka, &args.compression, "unused_by_polling", TOPIC)?;
    spec.outbox.table = format!("public.{TABLE}");
    spec.mode = RelayMode::Polling;
    let mut p = PollingSpec::with_order_column("seq");
    p.batch_size = args.batch.clamp(1, 10_000) as i32;
    spec.polling = Some(p);

    let lsn = current_lsn(sql).await?;
    let t = Instant::now();
    let mut worker = Worker::spawn(&spec, creds, dir)?;
    let deadline = t + drain_timeout(args.events);
    while rows(sql).await? > 0 {
        if Instant::now() > deadline {
            worker.stop().await;
            return Err("the polling relay did not empty its table in time".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.drain_secs = t.elapsed().as_secs_f64();
    r.drain_rate = args.events as f64 / r.drain_secs;
    r.worker_cpu_secs = worker.cpu_secs();
    r.extra_wal_per_event = (current_lsn(sql).await? - lsn) as f64 / args.events as f64;
    let records = topic_records(&kafka.bootstrap(), TOPIC).await?;
    if records < args.events {
        worker.stop().await;
        return Err(format!("{TOPIC} holds {records} records, fewer than the {} events", args.events).into());
    }

    // Idle pickups: the relay's wait has grown to its longest between events.
    let mut pickups = Vec::with_capacity(PICKUPS);
    for i in 0..PICKUPS {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t = Instant::now();
        preload(sql, Payload::Order, &format!("public.{TABLE}"), 1, 1).await?;
        while rows(sql).await? > 0 {
            if t.elapsed() > Duration::from_secs(30) {
                worker.stop().await;
                return Err(format!("pickup {i} took over 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pickups.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    // At the offered rate, one event per transaction, like the replication
    // relay's latency phase.
    let from = partition_offsets(&kafka.bootstrap(), TOPIC).await?;
    let writer = pg.client(DB).await?;
    let stmt = writer
        .prepare(&insert_sql(
            args.payload,
            &format!("public.{TABLE}"),
            "(SELECT $1::int8 AS i) AS s",
        ))
        .await?;
    let writers = [(writer, stmt)];
    let boundary = unix_micros();
    r.offered = offer(&writers, args.rate, args.latency_seconds, args.events).await?;
    let t = Instant::now();
    while rows(sql).await? > 0 {
        if t.elapsed() > Duration::from_secs(60) {
            worker.stop().await;
            return Err("the polling relay fell behind the offered rate".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
    let mut lat: Vec<f64> = read_latencies(&kafka.bootstrap(), TOPIC, from)
        .await?
        .into_iter()
        .filter(|(ts, ..)| *ts >= boundary)
        .map(|(.., ms)| ms)
        .collect();
    lat.sort_by(f64::total_cmp);
    if !lat.is_empty() {
        r.append_p50_ms = lat[lat.len() / 2];
        r.append_p99_ms = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
    }
    pickups.sort_by(f64::total_cmp);
    r.pickup_p50_ms = pickups[pickups.len() / 2];
    r.pickup_p99_ms = pickups[(pickups.len() * 99 / 100).min(pickups.len() - 1)];
    Ok(r)
}

/// The report's section, next to the replication relay's and the naive
/// publisher's medians from the rounds.
pub fn section(
    r: &PollModeResults,
    rate: u64,
    relay_rate: f64,
    naive_rate: f64,
    relay_wal: f64,
    naive_wal: f64,
) -> String {
    format!(
        "### Polling mode\n\n\
         | approach | drain (events/s) | extra WAL per event (bytes) |\n\
         |---|---|---|\n\
         | relay, replication (median of rounds) | {relay_rate:.0} | {relay_wal:.0} |\n\
         | relay, `mode: Polling` (deletes after ack) | {:.0} ({:.1} s, worker CPU {:.1} s) | {:.0} |\n\
         | naive polling publisher (median of rounds) | {naive_rate:.0} | {naive_wal:.0} |\n\n\
         Polling mode at {} events offered ({}/s, one per transaction): insert → broker append \
         p50 {:.1} ms, p99 {:.1} ms (the replication relay's, at the same rate, is in the first table). Idle relay, a single insert's commit → row deleted after the broker's ack: \
         p50 {:.0} ms, p99 {:.0} ms ({PICKUPS} events; the wait between empty polls grows to 500 ms, \
         `maxIntervalMs`).\n",
        r.drain_rate,
        r.drain_secs,
        r.worker_cpu_secs,
        r.extra_wal_per_event,
        r.offered,
        rate,
        r.append_p50_ms,
        r.append_p99_ms,
        r.pickup_p50_ms,
        r.pickup_p99_ms,
    )
}
