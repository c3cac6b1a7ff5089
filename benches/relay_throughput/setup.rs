//! Set-up: the test bed and what is on it. Starting and tuning PostgreSQL, the
//! relay's spec with its publication and slot (as the operator provisions them),
//! the outbox rows and their payloads, writing and measuring WAL, the broker's
//! warm-up, reading back what a topic holds, and the facts about the machine.
//!
//! Every phase stands on these, so they live apart from the phases: how rows are
//! generated or the servers tuned changes here, once, and every approach still
//! drains the same kind of rows from the same servers.

use std::time::{Duration, Instant};

use futures::future::join_all;
use outbox_operator::api::OutboxRelaySpec;
use outbox_operator::postgres::{self, QualifiedTable};
use outbox_operator::relay::config::RelayConfig;
use outbox_operator::relay::lsn::Lsn;
use outbox_testbed::{Components, Kafka, Postgres};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{Args, DB, Res};

const WARMUP_TOPIC: &str = "bench.warmup";

pub const AGGREGATES: i64 = 1000;
/// Lengths of the random parts that bring each payload's JSON text to about
/// 1024 bytes (the average is measured and printed at run time).
const HEX_PAD_CHARS: usize = 973;
const ORDER_TOKEN_CHARS: usize = 160;

/// Settings that help every approach alike: a buffer cache that holds both tables,
/// no checkpoint or autovacuum in the middle of a measurement (the bench runs
/// CHECKPOINT itself between phases; autovacuum would add WAL to whichever phase it
/// happened to run in, most likely the polling publisher's).
pub async fn tune_postgres(pg: &Postgres) -> Res<()> {
    let c = pg.client("postgres").await?;
    // One statement each: ALTER SYSTEM refuses to run inside a transaction block,
    // which is what a multi-statement simple query would be.
    for setting in [
        "shared_buffers = '1GB'",
        "max_wal_size = '16GB'",
        "checkpoint_timeout = '1h'",
        "autovacuum = off",
        // A slot pair per round and scenario (contention.rs) on top of the rounds'.
        "max_replication_slots = 64",
    ] {
        c.batch_execute(&format!("ALTER SYSTEM SET {setting}")).await?;
    }
    drop(c);
    // shared_buffers takes a restart.
    pg.stop().await?;
    pg.start_again().await?;
    Ok(())
}

pub fn relay_spec(pg: &Postgres, kafka: &Kafka, compression: &str, slot: &str, topic: &str) -> Res<OutboxRelaySpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "database": {
            "host": pg.host(), "port": pg.port(), "database": DB,
            "tls": {"mode": "Disable"},
            "credentialsSecretRef": {"name": "unused-in-the-bench"}
        },
        "outbox": {"table": "public.outbox"},
        "replication": {"slotName": slot},
        // The defaults (lz4 unless --compression says otherwise), spelled out: the
        // polling publisher and the broker warm-up use exactly these settings too.
        "kafka": {"bootstrapServers": kafka.bootstrap(), "topic": topic,
                  "producer": {"lingerMs": 5, "compression": compression}}
    }))?)
}

/// Publication and slot, as the operator provisions them.
pub async fn provision(cfg: &RelayConfig, spec: &OutboxRelaySpec, pg: &Postgres) -> Res<()> {
    let client = pg.client(DB).await?;
    let table = QualifiedTable::parse(&spec.outbox.table)?;
    postgres::check_prerequisites(&client, &table, &spec.outbox.columns, &cfg.slot).await?;
    postgres::ensure_publication(&client, &cfg.publication, &table).await?;
    postgres::ensure_slot(&client, &cfg.slot).await?;
    Ok(())
}

/// What the payloads look like; both are 1 KiB of JSON text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// An order as a service would publish it: customer, six line items, an
    /// address and a random token. Field names and values repeat across events,
    /// so lz4 shrinks a batch as it would shrink real traffic.
    Order,
    /// `{"pad": <hex>, "seq": i, "ts_us": ...}`: hex from SHA-512 that lz4 can
    /// hardly compress, the worst case for compression and broker bytes.
    Hex,
}

impl Payload {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "order" => Ok(Self::Order),
            "hex" => Ok(Self::Hex),
            other => Err(format!("--payload {other}: expected order or hex")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Order => "order",
            Self::Hex => "hex",
        }
    }

    /// The payload of row `i` as SQL; `ts_us` is the insert time, read back from
    /// Kafka for the end-to-end latency.
    pub fn sql(self, i: &str) -> String {
        let ts = "(extract(epoch FROM clock_timestamp()) * 1000000)::int8";
        match self {
            Self::Hex => format!(
                "jsonb_build_object('seq', {i}, 'ts_us', {ts}, \
                   'pad', substr((SELECT string_agg(encode(sha512(({i} * 8 + k)::text::bytea), 'hex'), '') \
                                  FROM generate_series(0, 7) AS k), 1, {HEX_PAD_CHARS}))"
            ),
            Self::Order => format!(
                "jsonb_build_object('seq', {i}, 'ts_us', {ts}, \
                   'orderId', md5({i}::text), 'status', 'CREATED', 'currency', 'EUR', \
                   'customer', jsonb_build_object('id', 'cust-' || ({i} * 7 % 50000), \
                       'name', 'Customer ' || ({i} * 7 % 50000), \
                       'email', 'customer' || ({i} * 7 % 50000) || '@example.com', \
                       'tier', (ARRAY['bronze', 'silver', 'gold'])[1 + {i} % 3]), \
                   'items', (SELECT jsonb_agg(jsonb_build_object( \
                       'sku', 'SKU-' || lpad((({i} * 31 + k * 7) % 100000)::text, 6, '0'), \
                       'name', 'Product ' || (({i} * 31 + k * 7) % 100000), \
                       'quantity', 1 + ({i} + k) % 5, \
                       'unitPrice', round((({i} * 13 + k * 17) % 10000) / 100.0, 2))) \
                     FROM generate_series(1, 6) AS k), \
                   'shippingAddress', jsonb_build_object('street', ({i} % 999) || ' Main Street', \
                       'city', (ARRAY['Berlin', 'Paris', 'Madrid', 'Rome', 'Vienna'])[1 + {i} % 5], \
                       'zip', lpad(({i} % 99999)::text, 5, '0'), 'country', 'DE'), \
                   'token', substr(encode(sha512({i}::text::bytea), 'hex') \
                                   || encode(sha512(({i} + 1)::text::bytea), 'hex'), 1, {ORDER_TOKEN_CHARS}))"
            ),
        }
    }
}

pub fn insert_sql(payload: Payload, table: &str, from: &str) -> String {
    format!(
        "INSERT INTO {table} (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'agg-' || (i % {AGGREGATES}), 'OrderCreated', {} FROM {from}",
        payload.sql("i")
    )
}

/// Inserts `events` rows, `batch` per transaction.
pub async fn preload(sql: &tokio_postgres::Client, payload: Payload, table: &str, events: i64, batch: i64) -> Res<()> {
    let stmt = sql
        .prepare(&insert_sql(payload, table, "generate_series($1::int8, $2::int8) AS i"))
        .await?;
    let mut n = 0;
    while n < events {
        let last = (n + batch).min(events) - 1;
        sql.execute(&stmt, &[&n, &last]).await?;
        n = last + 1;
    }
    Ok(())
}

pub async fn current_lsn(sql: &tokio_postgres::Client) -> Res<i64> {
    let lsn: Lsn = sql.query_one("SELECT pg_current_wal_lsn()", &[]).await?.get(0);
    Ok(u64::from(lsn) as i64)
}

pub async fn checkpoint(sql: &tokio_postgres::Client) -> Res<()> {
    sql.batch_execute("CHECKPOINT").await?;
    Ok(())
}

pub fn consumer(bootstrap: &str) -> Res<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "relay-bench-reader")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?)
}

/// High watermark of each partition.
pub async fn partition_offsets(bootstrap: &str, topic: &str) -> Res<Vec<i64>> {
    let (b, t) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || -> Res<Vec<i64>> {
        let c = consumer(&b)?;
        let md = c.fetch_metadata(Some(&t), Duration::from_secs(10))?;
        let n = md.topics().first().map_or(0, |t| t.partitions().len());
        (0..n as i32)
            .map(|p| Ok(c.fetch_watermarks(&t, p, Duration::from_secs(10))?.1))
            .collect()
    })
    .await?
}

/// Bytes of the topic's log segments on the broker's disk: what compression left.
pub fn kafka_log_bytes(kafka: &Kafka, topic: &str) -> u64 {
    let Some(data) = kafka.log_path().parent().map(|d| d.join("data")) else {
        return 0;
    };
    let prefix = format!("{topic}-");
    let Ok(dirs) = std::fs::read_dir(data) else { return 0 };
    dirs.flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flat_map(|files| files.flatten())
        .filter(|f| f.path().extension().is_some_and(|e| e == "log"))
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

pub async fn topic_records(bootstrap: &str, topic: &str) -> Res<i64> {
    Ok(partition_offsets(bootstrap, topic).await?.iter().sum())
}

/// Produces `count` records shaped like the events (the same generated payloads,
/// keys, headers, producer settings and topic settings) to a scratch topic: a
/// fresh JVM runs the produce path interpreted at first, and whichever phase came
/// first would pay for its JIT. Returns how long the new producer took to get its
/// first acknowledgement.
pub async fn warm_up_kafka(
    kafka: &Kafka,
    sql: &tokio_postgres::Client,
    cfg: &RelayConfig,
    args: &Args,
    count: i64,
) -> Res<f64> {
    kafka
        .create_topic_with_config(
            WARMUP_TOPIC,
            args.partitions,
            &[("message.timestamp.type", "LogAppendTime")],
        )
        .await?;
    // A thousand payloads from the same generator, from a range of numbers the
    // events never use, reused round-robin.
    let payloads: Vec<String> = sql
        .query(
            &format!(
                "SELECT {}::text FROM generate_series(1000000000::int8, 1000000999::int8) AS i",
                args.payload.sql("i")
            ),
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let created = Instant::now();
    let producer: FutureProducer = outbox_operator::kafka::producer_config(&cfg.kafka).create()?;
    let mut first_ack_ms = None;
    let mut n = 0;
    while n < count {
        let chunk = (count - n).min(10_000);
        let mut acks = Vec::with_capacity(chunk as usize);
        for i in n..n + chunk {
            let key = format!("agg-{}", i % AGGREGATES);
            let id = format!("{i:08x}-0000-4000-8000-{i:012x}");
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "id",
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: "type",
                    value: Some("OrderCreated".as_bytes()),
                });
            let payload = &payloads[i as usize % payloads.len()];
            let record = FutureRecord::to(WARMUP_TOPIC)
                .key(&key)
                .payload(payload)
                .headers(headers);
            acks.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        let mut acks = acks.into_iter();
        if first_ack_ms.is_none()
            && let Some(first) = acks.next()
        {
            first.await?.map_err(|(e, _)| e)?;
            first_ack_ms = Some(created.elapsed().as_secs_f64() * 1000.0);
        }
        for ack in join_all(acks).await {
            ack?.map_err(|(e, _)| e)?;
        }
        n += chunk;
    }
    Ok(first_ack_ms.unwrap_or(0.0))
}

/// The machine and the servers' versions, for the report's opening paragraph.
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_gib: f64,
    pub kernel: String,
    pub postgres: String,
    pub kafka: String,
}

pub async fn machine_facts(pg: &Postgres, c: &Components) -> Res<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let postgres: String = pg
        .client("postgres")
        .await?
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    let kafka = std::fs::read_dir(&c.kafka_libs)?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            // kafka_2.13-4.1.1.jar → 4.1.1
            n.strip_prefix("kafka_")
                .and_then(|v| v.strip_suffix(".jar"))
                .and_then(|v| v.split_once('-'))
                .filter(|(_, ver)| ver.chars().all(|c| c.is_ascii_digit() || c == '.'))
                .map(|(_, ver)| ver.to_string())
        })
        .next()
        .unwrap_or_else(|| "unknown".into());
    Ok(Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        mem_gib: mem_kib / 1024.0 / 1024.0,
        kernel,
        postgres,
        kafka,
    })
}
