//! The polling baseline: the naive publisher many applications run (lock a batch
//! of unsent rows, publish, wait for the acks, mark them sent, commit), over a
//! table of its own with the outbox's columns plus the `sent` flag.
//!
//! Kept apart from the relay's side so that it can be checked on its own: the
//! comparison is only fair while this stays as plain as what applications do and
//! its producer keeps exactly the relay's settings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use outbox_operator::relay::config::RelayConfig;
use outbox_testbed::Postgres;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::cpu::{CpuSample, proc_cpu_secs};
use crate::drain::Drain;
use crate::{Args, DB, Res};

/// The polling publisher's table: the same columns plus the `sent` flag, with the
/// partial index such a publisher needs to find unsent rows without a full scan.
pub fn poll_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE public.{table} (
            id bigserial PRIMARY KEY,
            aggregatetype text NOT NULL,
            aggregateid text,
            type text NOT NULL,
            payload jsonb,
            headers jsonb,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            sent boolean NOT NULL DEFAULT false
        );
        CREATE INDEX {table}_unsent ON public.{table} (id) WHERE NOT sent"
    )
}

/// The naive publisher, as many an application runs it: lock a batch of unsent
/// rows, publish them, wait for every acknowledgement, mark them sent, commit.
/// The producer has exactly the relay's settings (acks=all, idempotence, lz4,
/// linger 5 ms, no delivery timeout) and records carry the same key and headers.
///
/// Timed from the producer's creation, as the relay is timed from its process
/// start: both pay for connecting and for the idempotent producer's start.
pub async fn polling(
    args: &Args,
    pg: &Postgres,
    cfg: &RelayConfig,
    table: &str,
    topic: &str,
    kafka_pid: u32,
) -> Res<Drain> {
    let before = CpuSample::take(pg, kafka_pid)?;
    let self_cpu0 = proc_cpu_secs(std::process::id(), false).unwrap_or(0.0);
    let t = Instant::now();
    let producer: Arc<FutureProducer> = Arc::new(outbox_operator::kafka::producer_config(&cfg.kafka).create()?);
    let mut clients = Vec::new();
    for _ in 0..args.polling_workers {
        clients.push(pg.client(DB).await?);
    }
    let tasks = clients.into_iter().map(|mut client| {
        let producer = producer.clone();
        let batch = args.batch;
        let (table, topic) = (table.to_string(), topic.to_string());
        tokio::spawn(async move { poll_loop(&mut client, &producer, &table, &topic, batch).await })
    });
    let mut events = 0;
    for r in join_all(tasks).await {
        events += r??;
    }
    let secs = t.elapsed().as_secs_f64();
    let self_cpu = proc_cpu_secs(std::process::id(), false).unwrap_or(0.0) - self_cpu0;
    let mut cpu = CpuSample::take(pg, kafka_pid)?.since(&before, 0.0);
    // This process is the publisher: count it as the client.
    cpu.client = self_cpu;
    cpu.bench = 0.0;
    Ok(Drain {
        secs,
        events,
        cpu,
        steady: None,
    })
}

async fn poll_loop(
    client: &mut tokio_postgres::Client,
    producer: &FutureProducer,
    table: &str,
    topic: &str,
    batch: i64,
) -> Res<i64> {
    let select = format!(
        "SELECT id, aggregateid, type, payload::text FROM public.{table}
         WHERE NOT sent ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
    );
    let update = format!("UPDATE public.{table} SET sent = true WHERE id = ANY($1)");
    let mut events = 0;
    loop {
        let tx = client.transaction().await?;
        let rows = tx.query(&select, &[&batch]).await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(events);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut acks = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get(0);
            let key: Option<&str> = row.get(1);
            let event_type: &str = row.get(2);
            let payload: Option<&str> = row.get(3);
            let id_text = id.to_string();
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "id",
                    value: Some(id_text.as_bytes()),
                })
                .insert(Header {
                    key: "type",
                    value: Some(event_type.as_bytes()),
                });
            let mut record = FutureRecord::<str, str>::to(topic).headers(headers);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        acks.push(f);
                        break;
                    }
                    Err((e, back)) => {
                        if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::QueueFull) {
                            return Err(e.into());
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            ids.push(id);
        }
        for ack in join_all(acks).await {
            ack?.map_err(|(e, _)| e)?;
        }
        tx.execute(&update, &[&ids]).await?;
        tx.commit().await?;
        events += ids.len() as i64;
    }
}
