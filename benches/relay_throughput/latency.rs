//! The latency phase: a worker on a fresh slot (no backlog) while events arrive at
//! a steady offered rate, one per transaction, after a warm-up at the same rate.
//! The latency is read two ways: the worker's own commit→ack histogram, and each
//! record's broker append time (LogAppendTime) against the insert time in its
//! payload.
//!
//! A module of its own because it measures something other than the drains (time
//! per event under a steady load, not events per second through a backlog), with
//! its own load generator and its own reading of the topic and of the histogram.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::future::join_all;
use outbox_testbed::Postgres;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};

use crate::cpu::{Cpu, CpuSample};
use crate::drain::{Worker, wait_confirmed};
use crate::setup::{consumer, current_lsn, insert_sql, partition_offsets};
use crate::{Args, DB, LATENCY_TOPIC, Res};

#[derive(Default, Debug, Clone)]
pub struct Latency {
    pub offered: u64,
    pub offered_secs: f64,
    pub hist_count: u64,
    pub hist_p50_ms: Option<f64>,
    pub hist_p99_ms: Option<f64>,
    pub e2e_count: usize,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    pub cpu: Cpu,
}

/// Inserts `rate` events/s for `secs` seconds, one event per autocommit
/// transaction, pipelined on the connections in turn; returns how many.
pub async fn offer(
    writers: &[(tokio_postgres::Client, tokio_postgres::Statement)],
    rate: u64,
    secs: u64,
    first_seq: i64,
) -> Res<u64> {
    let total = rate * secs;
    let mut sent: u64 = 0;
    let t = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total {
        tick.tick().await;
        // Catch up on what is due by now, so a slow tick does not lower the rate.
        let due = ((t.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        let inserts = (sent..due).map(|k| {
            let seq = first_seq + k as i64;
            let (writer, stmt) = &writers[k as usize % writers.len()];
            async move { writer.execute(stmt, &[&seq]).await }
        });
        for r in join_all(inserts).await {
            r?;
        }
        sent = due;
    }
    Ok(total)
}

pub fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Offers `rate` events/s for `latency_seconds` (after `warmup_seconds` of the
/// same, not counted), one event per autocommit transaction, then reads the latency two ways: the worker's own commit→ack
/// histogram, and Kafka's append time against the insert time in each payload.
pub async fn latency(
    args: &Args,
    pg: &Postgres,
    bootstrap: &str,
    sql: &tokio_postgres::Client,
    slot: &str,
    worker: &mut Worker,
    kafka_pid: u32,
) -> Res<Latency> {
    let start_offsets = partition_offsets(bootstrap, LATENCY_TOPIC).await?;
    // One connection commits a few thousand single-row transactions a second
    // here (each commit waits for its WAL flush); higher rates get more of them.
    let mut writers = Vec::new();
    for _ in 0..args.rate.div_ceil(2500) {
        let writer = pg.client(DB).await?;
        let stmt = writer
            .prepare(&insert_sql(
                args.payload,
                "public.outbox",
                "(SELECT $1::int8 AS i) AS s",
            ))
            .await?;
        writers.push((writer, stmt));
    }
    // The same load without counting it first: the broker's JIT and the page cache
    // of fresh log segments make the first seconds slower than the steady state.
    let warm = offer(&writers, args.rate, args.warmup_seconds, args.events).await?;
    let boundary_us = unix_micros();
    let h0 = parse_histogram(&worker.metrics().await?);
    let before = CpuSample::take(pg, kafka_pid)?;
    let worker_cpu0 = worker.cpu_secs();
    let t = Instant::now();
    let total = offer(&writers, args.rate, args.latency_seconds, args.events + warm as i64).await?;
    let offered_secs = t.elapsed().as_secs_f64();
    let end = current_lsn(sql).await?;
    wait_confirmed(sql, slot, end, worker, Duration::from_secs(120), t).await?;
    let cpu = CpuSample::take(pg, kafka_pid)?.since(&before, worker.cpu_secs() - worker_cpu0);

    let h1 = parse_histogram(&worker.metrics().await?);
    // Counts since the measured part began: the worker's histogram also holds the
    // drain's and the warm-up's events.
    let diff: Vec<(f64, u64)> = h1
        .iter()
        .map(|&(le, n)| {
            let earlier = h0.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            (le, n.saturating_sub(earlier))
        })
        .collect();
    let hist_count = diff.last().map_or(0, |b| b.1);

    let mut samples = read_latencies(bootstrap, LATENCY_TOPIC, start_offsets).await?;
    samples.retain(|s| s.0 >= boundary_us);
    if let Some(path) = &args.dump_latencies {
        let mut csv = String::from("insert_unix_us,partition,insert_to_append_ms\n");
        for (ts, p, l) in &samples {
            let _ = writeln!(csv, "{ts},{p},{l:.3}");
        }
        std::fs::write(path, csv)?;
    }
    let mut lat: Vec<f64> = samples.iter().map(|s| s.2).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(((q * lat.len() as f64).ceil() as usize).saturating_sub(1))
            .copied()
    };
    Ok(Latency {
        offered: total,
        offered_secs,
        hist_count,
        hist_p50_ms: histogram_quantile(&diff, 0.50).map(|s| s * 1000.0),
        hist_p99_ms: histogram_quantile(&diff, 0.99).map(|s| s * 1000.0),
        e2e_count: lat.len(),
        e2e_p50_ms: pct(0.50).unwrap_or(f64::NAN),
        e2e_p99_ms: pct(0.99).unwrap_or(f64::NAN),
        e2e_max_ms: lat.last().copied().unwrap_or(f64::NAN),
        cpu,
    })
}

/// `(bucket upper bound, cumulative count)` in exposition order (ascending bounds).
fn parse_histogram(text: &str) -> Vec<(f64, u64)> {
    let prefix = "outbox_relay_commit_to_ack_seconds_bucket{le=\"";
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (le, tail) = rest.split_once("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let count = tail.split_whitespace().next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// The q-quantile of a cumulative histogram by linear interpolation inside the
/// bucket it falls in (what PromQL's histogram_quantile does). `None` when empty;
/// infinite when it falls in the +Inf bucket.
fn histogram_quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let target = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(le, cum) in buckets {
        if cum as f64 >= target {
            if le.is_infinite() {
                return Some(f64::INFINITY);
            }
            let inside = (cum - below) as f64;
            let frac = if inside > 0.0 {
                (target - below as f64) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = cum;
    }
    None
}

/// Reads every record from `from` to the current end and returns, per record,
/// the insert time in its payload (Unix µs), its partition, and broker append
/// time minus insert time in milliseconds.
pub async fn read_latencies(bootstrap: &str, topic: &str, from: Vec<i64>) -> Res<Vec<(i64, i32, f64)>> {
    let end = partition_offsets(bootstrap, topic).await?;
    let (b, t) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || -> Res<Vec<(i64, i32, f64)>> {
        let c = consumer(&b)?;
        let mut tpl = TopicPartitionList::new();
        let mut left: i64 = 0;
        for (p, (&f, &e)) in from.iter().zip(&end).enumerate() {
            if e > f {
                tpl.add_partition_offset(&t, p as i32, Offset::Offset(f))?;
                left += e - f;
            }
        }
        c.assign(&tpl)?;
        let mut out = Vec::with_capacity(left as usize);
        let deadline = Instant::now() + Duration::from_secs(120);
        while left > 0 && Instant::now() < deadline {
            let Some(m) = c.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m?;
            if m.offset() >= end[m.partition() as usize] {
                continue;
            }
            left -= 1;
            let Timestamp::LogAppendTime(append_ms) = m.timestamp() else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if let Some(ts_us) = v.get("ts_us").and_then(|t| t.as_i64()) {
                out.push((ts_us, m.partition(), append_ms as f64 - ts_us as f64 / 1000.0));
            }
        }
        Ok(out)
    })
    .await?
}
