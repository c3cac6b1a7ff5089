//! Relay throughput benchmark (not a timed test): drain rate, commit→ack latency
//! and memory of the release worker binary, next to two baselines measured on the
//! same machine in the same run:
//!
//! - `pg_recvlogical` draining a second slot over the same WAL to a file: the rate
//!   at which PostgreSQL can decode the outbox inserts at all;
//! - a naive polling publisher (`SELECT … FOR UPDATE SKIP LOCKED`, publish, wait
//!   for the acks, `UPDATE … SET sent = true`, commit) over a copy of the rows.
//!
//! It also measures the WAL each approach adds per event, and prints a markdown
//! table with PASS/MISS against the project's targets. See docs/benchmarks.md.
//!
//! Run it through `hack/bench` (which builds the release binary and fetches the
//! test bed); by hand: `cargo bench --bench relay_throughput -- --events 200000`.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use outbox_operator::api::OutboxRelaySpec;
use outbox_operator::postgres::{self, QualifiedTable};
use outbox_operator::relay::config::{Credentials, RelayConfig};
use outbox_operator::relay::lsn::Lsn;
use outbox_testbed::{Components, Kafka, Postgres};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DB: &str = "bench";
const WARMUP_TOPIC: &str = "bench.warmup";
const LATENCY_TOPIC: &str = "bench.latency";
const LATENCY_SLOT: &str = "bench_latency";
const AGGREGATES: i64 = 1000;
/// Lengths of the random parts that bring each payload's JSON text to about
/// 1024 bytes (the average is measured and printed at run time).
const HEX_PAD_CHARS: usize = 973;
const ORDER_TOKEN_CHARS: usize = 160;
const SLOT_POLL: Duration = Duration::from_millis(50);

/// The outbox table the relay reads, as in the integration tests.
use outbox_testbed::OUTBOX_DDL;

/// The polling publisher's table: the same columns plus the `sent` flag, with the
/// partial index such a publisher needs to find unsent rows without a full scan.
fn poll_ddl(table: &str) -> String {
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

/// Names of one round's slots, topics and table: every round drains the same
/// backlog again, each approach from its own copy.
struct RoundNames {
    relay_slot: String,
    relay_topic: String,
    recv_slot: String,
    poll_table: String,
    poll_topic: String,
}

impl RoundNames {
    fn new(round: usize) -> Self {
        Self {
            relay_slot: format!("bench_relay_{round}"),
            relay_topic: format!("bench.relay.{round}"),
            recv_slot: format!("bench_recvlogical_{round}"),
            poll_table: format!("poll_outbox_{round}"),
            poll_topic: format!("bench.polling.{round}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Args {
    events: i64,
    rate: u64,
    latency_seconds: u64,
    warmup_seconds: u64,
    batch: i64,
    partitions: i32,
    polling_workers: usize,
    out: Option<PathBuf>,
    dump_latencies: Option<PathBuf>,
    compression: String,
    payload: Payload,
    rounds: usize,
}

const USAGE: &str = "usage: relay_throughput [--events N] [--rate R] [--latency-seconds S] [--warmup-seconds W] \
[--batch B] [--partitions P] [--polling-workers K] [--compression C] [--payload order|hex] [--rounds K] [--out FILE] [--dump-latencies CSV]";

impl Args {
    fn parse(raw: &[String]) -> Result<Self, String> {
        let mut a = Args {
            events: 200_000,
            rate: 2000,
            latency_seconds: 20,
            warmup_seconds: 5,
            batch: 1000,
            partitions: 6,
            polling_workers: 1,
            out: None,
            dump_latencies: None,
            compression: "lz4".into(),
            payload: Payload::Order,
            rounds: 3,
        };
        let mut it = raw.iter();
        while let Some(arg) = it.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            // cargo bench appends --bench to the harness's arguments.
            if key == "--bench" {
                continue;
            }
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or(format!("{key} needs a value"))
            };
            let num = |v: String| v.parse::<u64>().map_err(|e| format!("{key} {v}: {e}"));
            match key {
                "--events" => a.events = num(value()?)? as i64,
                "--rate" => a.rate = num(value()?)?,
                "--latency-seconds" => a.latency_seconds = num(value()?)?,
                "--warmup-seconds" => a.warmup_seconds = num(value()?)?,
                "--batch" => a.batch = num(value()?)? as i64,
                "--partitions" => a.partitions = num(value()?)? as i32,
                "--polling-workers" => a.polling_workers = num(value()?)? as usize,
                "--out" => a.out = Some(PathBuf::from(value()?)),
                "--dump-latencies" => a.dump_latencies = Some(PathBuf::from(value()?)),
                "--compression" => a.compression = value()?,
                "--payload" => a.payload = Payload::parse(&value()?)?,
                "--rounds" => a.rounds = num(value()?)? as usize,
                _ => return Err(format!("unknown argument {arg}\n{USAGE}")),
            }
        }
        if a.events < 1 || a.batch < 1 || a.partitions < 1 || a.polling_workers < 1 || a.rounds < 1 {
            return Err(format!("counts must be positive\n{USAGE}"));
        }
        Ok(a)
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --benches` runs this binary without --bench: the benchmark takes
    // minutes and a machine of its own, so it only runs when asked for.
    if !raw.iter().any(|a| a == "--bench") {
        println!("relay_throughput: benchmark skipped outside `cargo bench` (run hack/bench)");
        return;
    }
    let args = match Args::parse(&raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        // The whole chain: tokio-postgres puts the server's message in the source.
        let mut msg = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("relay_throughput: failed: {msg}");
        std::process::exit(1);
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// Everything the run measures, for the report.
#[derive(Default, Debug)]
struct Results {
    load_before: String,
    payload_bytes: f64,
    insert_wal_per_event: f64,
    poll_insert_wal_per_event: f64,
    preload_secs: f64,
    first_ack_ms: f64,
    rounds: Vec<Round>,
    /// Of the last round's topics.
    relay_log_bytes: u64,
    poll_log_bytes: u64,
    lat: Latency,
    relay_rss_after_latency_kib: u64,
}

/// One drain of the backlog by each approach.
#[derive(Default, Debug, Clone)]
struct Round {
    recv: Drain,
    recv_file_bytes: u64,
    relay: Drain,
    relay_extra_wal: i64,
    relay_rss_kib: u64,
    relay_max_in_flight: i64,
    relay_first_ack: Option<f64>,
    poll: Drain,
    poll_extra_wal: i64,
}

/// One drain: how long, and who burnt the CPU meanwhile.
#[derive(Default, Debug, Clone)]
struct Drain {
    secs: f64,
    events: i64,
    cpu: Cpu,
    /// Start-up excluded: (seconds to the first progress, events/s from 10 % to
    /// 90 % of the backlog), where progress could be watched.
    steady: Option<(f64, f64)>,
}

impl Drain {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

/// From a progress timeline over a backlog from `start` to `end` (LSNs, or bytes
/// of output), all rows alike: when progress began, and the rate between 10 % and
/// 90 % of the way, which leaves out process start, connection and the tail.
fn steady_rate(progress: &[(f64, i64)], start: i64, end: i64, events: i64) -> Option<(f64, f64)> {
    let span = (end - start) as f64;
    let frac = |v: i64| (v - start) as f64 / span;
    let first = progress.iter().find(|p| frac(p.1) > 0.0)?.0;
    let at = |f: f64| progress.iter().find(|p| frac(p.1) >= f).copied();
    let (t10, v10) = at(0.1)?;
    let (t90, v90) = at(0.9)?;
    if t90 <= t10 {
        return None;
    }
    let share = (v90 - v10) as f64 / span;
    Some((first, share * events as f64 / (t90 - t10)))
}

#[derive(Default, Debug, Clone)]
struct Latency {
    offered: u64,
    offered_secs: f64,
    hist_count: u64,
    hist_p50_ms: Option<f64>,
    hist_p99_ms: Option<f64>,
    e2e_count: usize,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    e2e_max_ms: f64,
    cpu: Cpu,
}

async fn run(args: Args) -> Res<()> {
    let started = Instant::now();
    let components = Components::locate()?;
    log("starting PostgreSQL and Kafka");
    let (pg, kafka) = tokio::try_join!(Postgres::start(&components), Kafka::start(&components))?;
    let kafka_pid = find_kafka_pid(&kafka).ok_or("cannot find the Kafka broker's process")?;
    tune_postgres(&pg).await?;
    let machine = machine_facts(&pg, &components).await?;

    let admin = pg.client("postgres").await?;
    admin.batch_execute(&format!("CREATE DATABASE {DB}")).await?;
    let sql = pg.client(DB).await?;
    sql.batch_execute(OUTBOX_DDL).await?;
    let names: Vec<RoundNames> = (0..args.rounds).map(RoundNames::new).collect();
    // Same topic settings for every publisher. LogAppendTime stamps each record
    // with the broker's clock at append, for the end-to-end latency.
    let mut topics = vec![LATENCY_TOPIC.to_string()];
    for n in &names {
        sql.batch_execute(&poll_ddl(&n.poll_table)).await?;
        topics.push(n.relay_topic.clone());
        topics.push(n.poll_topic.clone());
    }
    for topic in &topics {
        kafka
            .create_topic_with_config(topic, args.partitions, &[("message.timestamp.type", "LogAppendTime")])
            .await?;
    }

    let dir = tempfile::Builder::new().prefix("relay-bench-").tempdir()?;
    let creds = Credentials {
        db_username: pg.user().to_string(),
        db_password: Some(pg.password().to_string()),
        ..Credentials::default()
    };
    let mut specs = Vec::new();
    for n in &names {
        specs.push(relay_spec(
            &pg,
            &kafka,
            &args.compression,
            &n.relay_slot,
            &n.relay_topic,
        )?);
    }
    let cfgs = specs
        .iter()
        .map(|s| RelayConfig::from_spec("bench", "bench", s, &creds))
        .collect::<Result<Vec<_>, _>>()?;
    let mut r = Results {
        load_before: std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        ..Results::default()
    };
    log("warming up the broker");
    r.first_ack_ms = warm_up_kafka(&kafka, &sql, &cfgs[0], &args, args.events.min(200_000)).await?;

    // The polling publisher's rows come first, before any slot exists, so neither
    // decoder has to skip over them.
    for (i, n) in names.iter().enumerate() {
        log(format!("preloading {} rows into {}", args.events, n.poll_table));
        let lsn = current_lsn(&sql).await?;
        preload(
            &sql,
            args.payload,
            &format!("public.{}", n.poll_table),
            args.events,
            args.batch,
        )
        .await?;
        if i == 0 {
            r.poll_insert_wal_per_event = (current_lsn(&sql).await? - lsn) as f64 / args.events as f64;
        }
    }

    // Every slot exists before the outbox rows are written, so all hold the same WAL.
    for (n, (spec, cfg)) in names.iter().zip(specs.iter().zip(&cfgs)) {
        provision(cfg, spec, &pg).await?;
        sql.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&n.recv_slot],
        )
        .await?;
    }
    checkpoint(&sql).await?;

    log(format!("preloading {} outbox rows", args.events));
    let lsn0 = current_lsn(&sql).await?;
    let t = Instant::now();
    preload(&sql, args.payload, "public.outbox", args.events, args.batch).await?;
    r.preload_secs = t.elapsed().as_secs_f64();
    let lsn1 = current_lsn(&sql).await?;
    r.insert_wal_per_event = (lsn1 - lsn0) as f64 / args.events as f64;
    r.payload_bytes = sql
        .query_one(
            "SELECT avg(octet_length(payload::text))::float8 FROM public.outbox",
            &[],
        )
        .await?
        .get(0);
    checkpoint(&sql).await?;

    // Rounds interleave the three approaches, so a slow spell of the machine
    // lands on all of them rather than on one.
    for (i, n) in names.iter().enumerate() {
        let mut round = Round::default();
        let tag = format!("round {}/{}", i + 1, args.rounds);

        // The decoding limit: pg_recvlogical over the same WAL.
        log(format!("{tag}: draining with pg_recvlogical"));
        let out_file = dir.path().join("recvlogical.out");
        round.recv = recvlogical(
            &pg,
            &sql,
            &n.recv_slot,
            &cfgs[i].publication,
            lsn1,
            &out_file,
            args.events,
            kafka_pid,
        )
        .await?;
        round.recv_file_bytes = std::fs::metadata(&out_file).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&out_file);
        checkpoint(&sql).await?;

        // The relay draining the backlog, from its process start.
        log(format!("{tag}: draining with the relay worker"));
        let before = CpuSample::take(&pg, kafka_pid)?;
        let lsn_a = current_lsn(&sql).await?;
        let t = Instant::now();
        let mut worker = Worker::spawn(&specs[i], &creds, dir.path())?;
        let progress = wait_confirmed(&sql, &cfgs[i].slot, lsn1, &mut worker, drain_timeout(args.events), t).await?;
        round.relay.secs = t.elapsed().as_secs_f64();
        round.relay.steady = steady_rate(&progress, lsn0, lsn1, args.events);
        round.relay.events = args.events;
        round.relay_extra_wal = current_lsn(&sql).await? - lsn_a;
        round.relay.cpu = CpuSample::take(&pg, kafka_pid)?.since(&before, worker.cpu_secs());
        round.relay_rss_kib = worker.peak_rss_kib()?;
        round.relay_max_in_flight = worker.max_in_flight;
        round.relay_first_ack = worker.first_ack;
        worker.stop().await;
        let records = topic_records(&kafka.bootstrap(), &n.relay_topic).await?;
        if records < args.events {
            return Err(format!(
                "{} holds {records} records, fewer than the {} events: the drain number would lie",
                n.relay_topic, args.events
            )
            .into());
        }
        r.relay_log_bytes = kafka_log_bytes(&kafka, &n.relay_topic);
        checkpoint(&sql).await?;

        // The polling publisher over its own copy of the rows.
        log(format!(
            "{tag}: draining with the polling publisher ({} worker(s), batches of {})",
            args.polling_workers, args.batch
        ));
        let lsn_c = current_lsn(&sql).await?;
        round.poll = polling(&args, &pg, &cfgs[i], &n.poll_table, &n.poll_topic, kafka_pid).await?;
        round.poll_extra_wal = current_lsn(&sql).await? - lsn_c;
        let records = topic_records(&kafka.bootstrap(), &n.poll_topic).await?;
        if records < args.events {
            return Err(format!("{} holds {records} records, fewer than {}", n.poll_topic, args.events).into());
        }
        r.poll_log_bytes = kafka_log_bytes(&kafka, &n.poll_topic);
        checkpoint(&sql).await?;
        r.rounds.push(round);
    }

    // Latency at a steady offered rate: a worker on a slot of its own, created
    // now, so it has no backlog to work through first.
    let spec = relay_spec(&pg, &kafka, &args.compression, LATENCY_SLOT, LATENCY_TOPIC)?;
    let cfg = RelayConfig::from_spec("bench", "bench", &spec, &creds)?;
    provision(&cfg, &spec, &pg).await?;
    let mut worker = Worker::spawn(&spec, &creds, dir.path())?;
    log(format!(
        "offering {} events/s for {} s (one event per transaction)",
        args.rate, args.latency_seconds
    ));
    r.lat = latency(&args, &pg, &kafka.bootstrap(), &sql, &cfg.slot, &mut worker, kafka_pid).await?;
    r.relay_rss_after_latency_kib = worker.peak_rss_kib()?;
    worker.stop().await;

    let report = report(&args, &r, &machine, started.elapsed());
    println!("\n{report}");
    if let Some(path) = &args.out {
        std::fs::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}

fn drain_timeout(events: i64) -> Duration {
    // Far above any plausible run; only there so a wedged run ends by itself.
    Duration::from_secs(120 + (events as u64) / 500)
}

/// Settings that help every approach alike: a buffer cache that holds both tables,
/// no checkpoint or autovacuum in the middle of a measurement (the bench runs
/// CHECKPOINT itself between phases; autovacuum would add WAL to whichever phase it
/// happened to run in, most likely the polling publisher's).
async fn tune_postgres(pg: &Postgres) -> Res<()> {
    let c = pg.client("postgres").await?;
    // One statement each: ALTER SYSTEM refuses to run inside a transaction block,
    // which is what a multi-statement simple query would be.
    for setting in [
        "shared_buffers = '1GB'",
        "max_wal_size = '16GB'",
        "checkpoint_timeout = '1h'",
        "autovacuum = off",
    ] {
        c.batch_execute(&format!("ALTER SYSTEM SET {setting}")).await?;
    }
    drop(c);
    // shared_buffers takes a restart.
    pg.stop().await?;
    pg.start_again().await?;
    Ok(())
}

fn relay_spec(pg: &Postgres, kafka: &Kafka, compression: &str, slot: &str, topic: &str) -> Res<OutboxRelaySpec> {
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
async fn provision(cfg: &RelayConfig, spec: &OutboxRelaySpec, pg: &Postgres) -> Res<()> {
    let client = pg.client(DB).await?;
    let table = QualifiedTable::parse(&spec.outbox.table)?;
    postgres::check_prerequisites(&client, &table, &spec.outbox.columns, &cfg.slot).await?;
    postgres::ensure_publication(&client, &cfg.publication, &table).await?;
    postgres::ensure_slot(&client, &cfg.slot).await?;
    Ok(())
}

/// What the payloads look like; both are 1 KiB of JSON text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Payload {
    /// An order as a service would publish it: customer, six line items, an
    /// address and a random token. Field names and values repeat across events,
    /// so lz4 shrinks a batch as it would shrink real traffic.
    Order,
    /// `{"pad": <hex>, "seq": i, "ts_us": ...}`: hex from SHA-512 that lz4 can
    /// hardly compress, the worst case for compression and broker bytes.
    Hex,
}

impl Payload {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "order" => Ok(Self::Order),
            "hex" => Ok(Self::Hex),
            other => Err(format!("--payload {other}: expected order or hex")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Order => "order",
            Self::Hex => "hex",
        }
    }

    /// The payload of row `i` as SQL; `ts_us` is the insert time, read back from
    /// Kafka for the end-to-end latency.
    fn sql(self, i: &str) -> String {
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

fn insert_sql(payload: Payload, table: &str, from: &str) -> String {
    format!(
        "INSERT INTO {table} (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'agg-' || (i % {AGGREGATES}), 'OrderCreated', {} FROM {from}",
        payload.sql("i")
    )
}

/// Inserts `events` rows, `batch` per transaction.
async fn preload(sql: &tokio_postgres::Client, payload: Payload, table: &str, events: i64, batch: i64) -> Res<()> {
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

async fn current_lsn(sql: &tokio_postgres::Client) -> Res<i64> {
    let lsn: Lsn = sql.query_one("SELECT pg_current_wal_lsn()", &[]).await?.get(0);
    Ok(u64::from(lsn) as i64)
}

async fn checkpoint(sql: &tokio_postgres::Client) -> Res<()> {
    sql.batch_execute("CHECKPOINT").await?;
    Ok(())
}

async fn confirmed_flush(sql: &tokio_postgres::Client, slot: &str) -> Res<i64> {
    let row = sql
        .query_one(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let lsn: Option<Lsn> = row.get(0);
    Ok(lsn.map_or(0, |l| u64::from(l) as i64))
}

/// Waits until the slot's confirmed position reaches `target`: the relay confirms
/// only what Kafka acknowledged, so then every event before `target` is in Kafka.
/// Returns the progress seen on the way: (seconds since `since`, confirmed LSN).
async fn wait_confirmed(
    sql: &tokio_postgres::Client,
    slot: &str,
    target: i64,
    worker: &mut Worker,
    timeout: Duration,
    since: Instant,
) -> Res<Vec<(f64, i64)>> {
    let deadline = Instant::now() + timeout;
    let mut progress = Vec::new();
    loop {
        let confirmed = confirmed_flush(sql, slot).await?;
        progress.push((since.elapsed().as_secs_f64(), confirmed));
        // The worker updates this gauge every confirm interval (100 ms); near the
        // cap means Kafka was the slower side, near zero means decoding was.
        if let Ok(text) = worker.metrics().await {
            if let Some(n) = gauge(&text, "outbox_relay_in_flight_events") {
                worker.max_in_flight = worker.max_in_flight.max(n as i64);
            }
            if worker.first_ack.is_none()
                && gauge(&text, "outbox_relay_events_total{outcome=\"relayed\"}").is_some_and(|n| n > 0.0)
            {
                worker.first_ack = Some(since.elapsed().as_secs_f64());
            }
        }
        if confirmed >= target {
            return Ok(progress);
        }
        if let Some(status) = worker.child.try_wait()? {
            return Err(format!("the worker exited ({status}); its log:\n{}", worker.log_tail()).into());
        }
        if Instant::now() > deadline {
            return Err(format!("slot {slot} did not reach {target} within {timeout:?}").into());
        }
        tokio::time::sleep(SLOT_POLL).await;
    }
}

/// The release worker binary as a child process, as it runs in a pod.
struct Worker {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    /// Highest `outbox_relay_in_flight_events` seen while waiting for it.
    max_in_flight: i64,
    /// When the first acknowledgement was seen in its metrics (seconds since the
    /// wait's start).
    first_ack: Option<f64>,
}

impl Worker {
    fn spawn(spec: &OutboxRelaySpec, creds: &Credentials, dir: &Path) -> Res<Self> {
        let spec_path = dir.join("relay.json");
        let doc = serde_json::json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": spec,
        });
        std::fs::write(&spec_path, serde_json::to_vec(&doc)?)?;
        let metrics = free_addr()?;
        let log = dir.join("worker.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(worker_binary())
            .args(["--log-format", "text", "relay", "--listen"])
            .arg(metrics.to_string())
            .arg("--spec")
            .arg(&spec_path)
            .env("OUTBOX_DB_USERNAME", &creds.db_username)
            .env("OUTBOX_DB_PASSWORD", creds.db_password.as_deref().unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self {
            child,
            metrics,
            log,
            max_in_flight: 0,
            first_ack: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.pid(), false).unwrap_or(0.0)
    }

    /// VmHWM: the most resident memory the process ever had.
    fn peak_rss_kib(&self) -> Res<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| "no VmHWM in /proc/PID/status".into())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn metrics(&self) -> Res<String> {
        let mut s = tokio::net::TcpStream::connect(self.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(text))
    }

    /// SIGTERM (the graceful stop a pod gets), SIGKILL if that takes too long.
    async fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    // A failed run must not leave a worker streaming from a slot behind it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The worker binary built with this bench, unless OUTBOX_BENCH_WORKER names
/// another one (to compare two builds on the same bed).
fn worker_binary() -> PathBuf {
    std::env::var_os("OUTBOX_BENCH_WORKER")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_outbox-operator")), PathBuf::from)
}

fn free_addr() -> Res<SocketAddr> {
    // Bound and released at once; the worker binds it a moment later.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `pg_recvlogical` from the second slot to a file, stopping at `endpos`.
// Each argument is one fact about the run; a struct for a single caller would
// only move them around.
#[allow(clippy::too_many_arguments)]
async fn recvlogical(
    pg: &Postgres,
    sql: &tokio_postgres::Client,
    slot: &str,
    publication: &str,
    endpos: i64,
    out: &Path,
    events: i64,
    kafka_pid: u32,
) -> Res<Drain> {
    let before = CpuSample::take(pg, kafka_pid)?;
    let t = Instant::now();
    let mut child = Command::new(pg.bin_dir().join("pg_recvlogical"))
        .args(["--start", "--slot", slot, "--no-loop"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={publication}"))
        .arg("--endpos")
        .arg(Lsn::from(endpos as u64).to_string())
        .arg("-f")
        .arg(out)
        .args(["-h", pg.host(), "-p", &pg.port().to_string(), "-U", pg.user(), "-d", DB])
        .env("PGPASSWORD", pg.password())
        .stdin(Stdio::null())
        .spawn()?;
    // Sampled while it runs: once it exits, its times are folded into ours.
    let pid = child.id();
    let mut child_cpu = 0.0;
    let mut progress = Vec::new();
    let deadline = Instant::now() + drain_timeout(0) * 10;
    let status = loop {
        child_cpu = proc_cpu_secs(pid, false).unwrap_or(child_cpu);
        let written = std::fs::metadata(out).map_or(0, |m| m.len() as i64);
        progress.push((t.elapsed().as_secs_f64(), written));
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("pg_recvlogical did not reach the end position in time".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("pg_recvlogical failed: {status}").into());
    }
    let reached = sql
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &Lsn::from(endpos as u64).to_string()],
        )
        .await?
        .get::<_, bool>(0);
    if !reached {
        log("note: pg_recvlogical exited before confirming the end position");
    }
    let cpu = CpuSample::take(pg, kafka_pid)?.since(&before, child_cpu);
    let written = std::fs::metadata(out).map_or(0, |m| m.len() as i64);
    let steady = steady_rate(&progress, 0, written, events);
    Ok(Drain {
        secs,
        events,
        cpu,
        steady,
    })
}

/// Inserts `rate` events/s for `secs` seconds, one event per autocommit
/// transaction, pipelined on one connection; returns how many.
async fn offer(
    writer: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
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
            async move { writer.execute(stmt, &[&seq]).await }
        });
        for r in join_all(inserts).await {
            r?;
        }
        sent = due;
    }
    Ok(total)
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Offers `rate` events/s for `latency_seconds` (after `warmup_seconds` of the
/// same, not counted), one event per autocommit transaction, then reads the latency two ways: the worker's own commit→ack
/// histogram, and Kafka's append time against the insert time in each payload.
async fn latency(
    args: &Args,
    pg: &Postgres,
    bootstrap: &str,
    sql: &tokio_postgres::Client,
    slot: &str,
    worker: &mut Worker,
    kafka_pid: u32,
) -> Res<Latency> {
    let start_offsets = partition_offsets(bootstrap, LATENCY_TOPIC).await?;
    let writer = pg.client(DB).await?;
    let stmt = writer
        .prepare(&insert_sql(
            args.payload,
            "public.outbox",
            "(SELECT $1::int8 AS i) AS s",
        ))
        .await?;
    // The same load without counting it first: the broker's JIT and the page cache
    // of fresh log segments make the first seconds slower than the steady state.
    let warm = offer(&writer, &stmt, args.rate, args.warmup_seconds, args.events).await?;
    let boundary_us = unix_micros();
    let h0 = parse_histogram(&worker.metrics().await?);
    let before = CpuSample::take(pg, kafka_pid)?;
    let worker_cpu0 = worker.cpu_secs();
    let t = Instant::now();
    let total = offer(
        &writer,
        &stmt,
        args.rate,
        args.latency_seconds,
        args.events + warm as i64,
    )
    .await?;
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

/// The value of an unlabelled gauge in the exposition text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
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

fn consumer(bootstrap: &str) -> Res<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "relay-bench-reader")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?)
}

/// High watermark of each partition.
async fn partition_offsets(bootstrap: &str, topic: &str) -> Res<Vec<i64>> {
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
fn kafka_log_bytes(kafka: &Kafka, topic: &str) -> u64 {
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

async fn topic_records(bootstrap: &str, topic: &str) -> Res<i64> {
    Ok(partition_offsets(bootstrap, topic).await?.iter().sum())
}

/// Reads every record from `from` to the current end and returns, per record,
/// the insert time in its payload (Unix µs), its partition, and broker append
/// time minus insert time in milliseconds.
async fn read_latencies(bootstrap: &str, topic: &str, from: Vec<i64>) -> Res<Vec<(i64, i32, f64)>> {
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

/// Produces `count` records shaped like the events (the same generated payloads,
/// keys, headers, producer settings and topic settings) to a scratch topic: a
/// fresh JVM runs the produce path interpreted at first, and whichever phase came
/// first would pay for its JIT. Returns how long the new producer took to get its
/// first acknowledgement.
async fn warm_up_kafka(
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

/// The naive publisher, as many an application runs it: lock a batch of unsent
/// rows, publish them, wait for every acknowledgement, mark them sent, commit.
/// The producer has exactly the relay's settings (acks=all, idempotence, lz4,
/// linger 5 ms, no delivery timeout) and records carry the same key and headers.
///
/// Timed from the producer's creation, as the relay is timed from its process
/// start: both pay for connecting and for the idempotent producer's start.
async fn polling(
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

// ---- CPU accounting -------------------------------------------------------

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces).
fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // Index 0 is the state letter; keep positions by mapping it to 0.
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// User+system CPU seconds of a process (all its threads); with `children`, plus
/// the times of the children it has waited for.
fn proc_cpu_secs(pid: u32, children: bool) -> Option<f64> {
    let f = proc_stat(pid)?;
    // utime, stime, cutime, cstime are fields 14-17 of the file.
    let mut ticks = f.get(11)? + f.get(12)?;
    if children {
        ticks += f.get(13)? + f.get(14)?;
    }
    Some(ticks as f64 / clock_ticks())
}

/// All of PostgreSQL: the postmaster with every child it reaped, plus the live
/// children (backends, walsenders, background processes).
fn postgres_cpu_secs(pg: &Postgres) -> Res<f64> {
    let pidfile = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))?;
    let postmaster: u32 = pidfile.lines().next().unwrap_or_default().trim().parse()?;
    let mut total = proc_cpu_secs(postmaster, true).ok_or("postmaster is gone")?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // Field 4 (ppid) is index 1 here.
        if let Some(f) = proc_stat(pid)
            && f.get(1) == Some(&u64::from(postmaster))
        {
            total += proc_cpu_secs(pid, false).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// The broker is the JVM whose command line names this bed's config file (its
/// watchdog shell names it too, hence the check of the program name).
fn find_kafka_pid(kafka: &Kafka) -> Option<u32> {
    let config = kafka.log_path().parent()?.join("server.properties");
    let config = config.to_string_lossy();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = Path::new(argv.first()?).file_name()?.to_string_lossy().into_owned();
        (program == "java" && argv.iter().any(|a| a == "kafka.Kafka") && argv.iter().any(|a| *a == *config))
            .then_some(pid)
    })
}

#[derive(Clone, Copy, Debug, Default)]
struct CpuSample {
    pg: f64,
    kafka: f64,
    driver: f64,
    /// Busy time of the whole machine, all CPUs.
    machine: f64,
}

/// Busy CPU seconds of the whole machine since boot (the first line of /proc/stat,
/// without idle and iowait).
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0.0 };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / clock_ticks()
}

impl CpuSample {
    fn take(pg: &Postgres, kafka_pid: u32) -> Res<Self> {
        Ok(Self {
            pg: postgres_cpu_secs(pg)?,
            kafka: proc_cpu_secs(kafka_pid, false).ok_or("the Kafka broker is gone")?,
            driver: proc_cpu_secs(std::process::id(), false).unwrap_or(0.0),
            machine: machine_busy_secs(),
        })
    }

    fn since(&self, before: &CpuSample, client: f64) -> Cpu {
        let mut cpu = Cpu {
            postgres: self.pg - before.pg,
            kafka: self.kafka - before.kafka,
            bench: self.driver - before.driver,
            client,
            other: 0.0,
        };
        let ours = cpu.postgres + cpu.kafka + cpu.bench + cpu.client;
        cpu.other = (self.machine - before.machine - ours).max(0.0);
        cpu
    }
}

/// CPU seconds spent during one phase.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    postgres: f64,
    kafka: f64,
    /// This process (for the polling phase it is the publisher itself).
    bench: f64,
    /// The client under test: the worker, or pg_recvlogical.
    client: f64,
    /// Everything else on the machine (the kernel's own work included): a large
    /// number means something else competed for the CPUs and the phase is suspect.
    other: f64,
}

// ---- report ---------------------------------------------------------------

struct Machine {
    cpus: usize,
    cpu_model: String,
    mem_gib: f64,
    kernel: String,
    postgres: String,
    kafka: String,
}

async fn machine_facts(pg: &Postgres, c: &Components) -> Res<Machine> {
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

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_infinite() => "> 32.8 s".into(),
        Some(v) => format!("{v:.1} ms"),
        None => "n/a".into(),
    }
}

fn cpu_line(name: &str, d: &Drain, client: &str) -> String {
    // CPU milliseconds per 1000 events.
    let per_k = |s: f64| s * 1e6 / d.events.max(1) as f64;
    format!(
        "| {name} | {:.1} s | {client} {:.1} s | {:.1} s | {:.1} s | {:.1} s | {:.1} s | {:.1} ms |",
        d.secs,
        d.cpu.client,
        d.cpu.postgres,
        d.cpu.kafka,
        d.cpu.bench,
        d.cpu.other,
        per_k(d.cpu.client + d.cpu.postgres + d.cpu.kafka + d.cpu.bench),
    )
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `median (min–max)` of one figure over the rounds, or just the value for one round.
fn spread(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let med = median(v.to_vec());
    if v.len() < 2 {
        return fmt(med);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}–{})", fmt(med), fmt(lo), fmt(hi))
}

/// A drain whose every figure is the mean over the rounds, for the CPU table.
fn mean_drain(ds: &[&Drain]) -> Drain {
    let n = ds.len().max(1) as f64;
    let sum = |f: &dyn Fn(&Drain) -> f64| ds.iter().map(|d| f(d)).sum::<f64>() / n;
    Drain {
        secs: sum(&|d| d.secs),
        events: ds.first().map_or(0, |d| d.events),
        cpu: Cpu {
            postgres: sum(&|d| d.cpu.postgres),
            kafka: sum(&|d| d.cpu.kafka),
            bench: sum(&|d| d.cpu.bench),
            client: sum(&|d| d.cpu.client),
            other: sum(&|d| d.cpu.other),
        },
        steady: None,
    }
}

fn report(args: &Args, r: &Results, m: &Machine, total: Duration) -> String {
    let n = args.events as f64;
    let rounds = &r.rounds;
    let col = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let rate = |v: f64| format!("{v:.0}/s");
    let times = |v: f64| format!("{v:.2}×");
    let relay = col(&|x| x.relay.rate());
    let recv = col(&|x| x.recv.rate());
    let poll = col(&|x| x.poll.rate());
    let steady = |d: &Drain| d.steady.map_or(f64::NAN, |s| s.1);
    let relay_steady = col(&|x| steady(&x.relay));
    let recv_steady = col(&|x| steady(&x.recv));
    let vs_recv = col(&|x| x.relay.rate() / x.recv.rate());
    let vs_recv_steady = col(&|x| steady(&x.relay) / steady(&x.recv));
    let vs_poll = col(&|x| x.relay.rate() / x.poll.rate());
    let relay_secs = col(&|x| x.relay.secs);
    let recv_secs = col(&|x| x.recv.secs);
    let poll_secs = col(&|x| x.poll.secs);
    // The worst round for the targets that must always hold.
    let relay_extra = col(&|x| x.relay_extra_wal as f64 / n).into_iter().fold(0.0, f64::max);
    let poll_extra = median(col(&|x| x.poll_extra_wal as f64 / n));
    let relay_extra_pct = 100.0 * relay_extra / r.insert_wal_per_event;
    let poll_extra_pct = 100.0 * poll_extra / r.insert_wal_per_event;
    let rss_drain = col(&|x| x.relay_rss_kib as f64 / 1024.0);
    let rss_lat = r.relay_rss_after_latency_kib as f64 / 1024.0;
    let rss_max = rss_drain.iter().copied().fold(rss_lat, f64::max);
    let l = &r.lat;
    let p99_worst = l.hist_p99_ms.unwrap_or(f64::INFINITY).max(l.e2e_p99_ms);
    let offered_rate = l.offered as f64 / l.offered_secs;

    let mut o = String::new();
    let _ = writeln!(o, "## Relay throughput benchmark\n");
    let _ = writeln!(
        o,
        "{} events of {:.0} bytes of JSON ({} payloads, {} aggregates, {} per transaction), topics of {} partitions; \
         PostgreSQL {}, Kafka {} (KRaft, one node), {} CPUs ({}), {:.0} GiB RAM, Linux {}. \
         PostgreSQL, Kafka, the worker and the bench share the CPUs. Load average before the run: {}. \
         Whole run {:.0} s{}.\n",
        args.events,
        r.payload_bytes,
        args.payload.name(),
        AGGREGATES,
        args.batch,
        args.partitions,
        m.postgres,
        m.kafka,
        m.cpus,
        m.cpu_model,
        m.mem_gib,
        m.kernel,
        r.load_before,
        total.as_secs_f64(),
        if std::env::var_os("OUTBOX_BENCH_WORKER").is_some_and(|v| !v.is_empty()) {
            "; worker binary taken from OUTBOX_BENCH_WORKER"
        } else {
            ""
        },
    );
    let _ = writeln!(
        o,
        "{} round(s), each draining the same backlog with each approach in turn; figures are the median \
         over the rounds with the range in brackets, and a ratio is taken within each round first.\n",
        rounds.len()
    );
    let _ = writeln!(o, "| Measure | Value | Target | Result |");
    let _ = writeln!(o, "| --- | --- | --- | --- |");
    let _ = writeln!(
        o,
        "| Relay drain (release worker, from its start until the slot confirms the last commit) | {} in {:.1} s | | |",
        spread(&relay, rate),
        median(relay_secs)
    );
    let _ = writeln!(
        o,
        "| pg_recvlogical drain (same WAL, to a file) | {} in {:.1} s | | |",
        spread(&recv, rate),
        median(recv_secs)
    );
    let _ = writeln!(
        o,
        "| Polling publisher drain ({} worker(s), batches of {}) | {} in {:.1} s | | |",
        args.polling_workers,
        args.batch,
        spread(&poll, rate),
        median(poll_secs)
    );
    let _ = writeln!(
        o,
        "| Relay / pg_recvlogical | {} | ≥ 0.8× | {} |",
        spread(&vs_recv, times),
        verdict(median(vs_recv.clone()) >= 0.8)
    );
    let _ = writeln!(
        o,
        "| Relay / polling publisher | {} | ≥ 2× | {} |",
        spread(&vs_poll, times),
        verdict(median(vs_poll.clone()) >= 2.0)
    );
    let _ = writeln!(
        o,
        "| Steady rates, 10–90 % of the backlog (start-up left out): relay / pg_recvlogical | {} / {} = {} | | |",
        spread(&relay_steady, rate),
        spread(&recv_steady, rate),
        spread(&vs_recv_steady, times)
    );
    let _ = writeln!(
        o,
        "| WAL per event, the outbox inserts alone | {:.0} bytes | | |",
        r.insert_wal_per_event
    );
    let _ = writeln!(
        o,
        "| Extra WAL per event, relay (during its drain, worst round) | {relay_extra:.2} bytes ({relay_extra_pct:.2} %) | ≤ 5 % | {} |",
        verdict(relay_extra_pct <= 5.0)
    );
    let _ = writeln!(
        o,
        "| Extra WAL per event, polling publisher (its `FOR UPDATE` row locks and `UPDATE … SET sent`) | {poll_extra:.0} bytes ({poll_extra_pct:.0} %) | | |"
    );
    let _ = writeln!(
        o,
        "| Commit→ack p50 / p99, worker histogram (interpolated in 2× buckets) | {} / {} | | |",
        ms(l.hist_p50_ms),
        ms(l.hist_p99_ms)
    );
    let _ = writeln!(
        o,
        "| Insert→broker append p50 / p99 / max, from Kafka's LogAppendTime (1 ms resolution) | {:.1} / {:.1} / {:.1} ms | | |",
        l.e2e_p50_ms, l.e2e_p99_ms, l.e2e_max_ms
    );
    let _ = writeln!(
        o,
        "| p99 latency at {offered_rate:.0} events/s offered (worse of the two) | {p99_worst:.1} ms | ≤ 50 ms at 2k/s | {} |",
        // The target is stated at 2k events/s; a lighter load proves nothing about it.
        if offered_rate < 0.95 * 2000.0 {
            "n/a (offered < 2k/s)"
        } else {
            verdict(p99_worst <= 50.0)
        }
    );
    let _ = writeln!(
        o,
        "| Worker peak RSS (VmHWM): drain workers / latency-phase worker | {} / {rss_lat:.1} MiB | ≤ 100 MiB | {} |",
        spread(&rss_drain, |v| format!("{v:.1}")),
        verdict(rss_max <= 100.0)
    );

    let _ = writeln!(o, "\nEach round:\n");
    let _ = writeln!(
        o,
        "| Round | Relay | Relay 10–90 % | First ack | Most in flight | Peak RSS | pg_recvlogical | pg_recvlogical 10–90 % | Polling | Relay / recvlogical | Relay / polling |"
    );
    let _ = writeln!(o, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, x) in rounds.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {:.0}/s | {:.0}/s | {} | {} | {:.1} MiB | {:.0}/s | {:.0}/s | {:.0}/s | {:.2}× | {:.2}× |",
            i + 1,
            x.relay.rate(),
            steady(&x.relay),
            x.relay_first_ack.map_or("n/a".into(), |t| format!("{t:.2} s")),
            x.relay_max_in_flight,
            x.relay_rss_kib as f64 / 1024.0,
            x.recv.rate(),
            steady(&x.recv),
            x.poll.rate(),
            x.relay.rate() / x.recv.rate(),
            x.relay.rate() / x.poll.rate(),
        );
    }

    let _ = writeln!(
        o,
        "\nCPU seconds per phase, mean over the rounds (\"ours\" is client, PostgreSQL, Kafka and bench together):\n"
    );
    let _ = writeln!(
        o,
        "| Phase | Wall | Client | PostgreSQL | Kafka | Bench process | Other processes | Ours per 1000 events |"
    );
    let _ = writeln!(o, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let recvs: Vec<&Drain> = rounds.iter().map(|x| &x.recv).collect();
    let relays: Vec<&Drain> = rounds.iter().map(|x| &x.relay).collect();
    let polls: Vec<&Drain> = rounds.iter().map(|x| &x.poll).collect();
    let _ = writeln!(
        o,
        "{}",
        cpu_line("pg_recvlogical drain", &mean_drain(&recvs), "pg_recvlogical")
    );
    let _ = writeln!(o, "{}", cpu_line("Relay drain", &mean_drain(&relays), "worker"));
    let _ = writeln!(o, "{}", cpu_line("Polling publisher", &mean_drain(&polls), "publisher"));
    let lat_drain = Drain {
        secs: l.offered_secs,
        events: l.offered as i64,
        cpu: l.cpu,
        steady: None,
    };
    let _ = writeln!(
        o,
        "{}",
        cpu_line("Latency phase (inserts included)", &lat_drain, "worker")
    );

    let _ = writeln!(o, "\nDetails:\n");
    let _ = writeln!(
        o,
        "- Latency phase: a worker on a fresh slot; {} events offered in {:.1} s after {} s of warm-up at the \
         same rate (not counted), one INSERT per transaction, pipelined on one connection, a batch every \
         10 ms. The worker's histogram counted {} events in that window, the topic read back {}.",
        l.offered, l.offered_secs, args.warmup_seconds, l.hist_count, l.e2e_count,
    );
    let tuning = outbox_operator::relay::config::Tuning::default();
    let _ = writeln!(
        o,
        "- Relay drains: the worker pauses reading at {} events or {:.0} MiB of records in flight; a \
         round at that cap had Kafka as the slower side. \"First ack\" is counted from the worker's \
         process start.",
        tuning.max_in_flight,
        tuning.max_in_flight_bytes as f64 / 1048576.0,
    );
    let _ = writeln!(
        o,
        "- Kafka: {} compression; log bytes per event on the broker's disk: relay {:.0}, polling {:.0}. \
         The warm-up producer's first acknowledgement took {:.0} ms. Every topic was checked to hold \
         at least {} records.",
        args.compression,
        r.relay_log_bytes as f64 / n,
        r.poll_log_bytes as f64 / n,
        r.first_ack_ms,
        args.events,
    );
    let _ = writeln!(
        o,
        "- PostgreSQL: a polling table's inserts write {:.0} WAL bytes per event (its partial index \
         on unsent rows comes on top of the outbox's); pg_recvlogical wrote {:.0} MiB per drain. \
         The outbox preload took {:.1} s.",
        r.poll_insert_wal_per_event,
        median(col(&|x| x.recv_file_bytes as f64)) / 1048576.0,
        r.preload_secs,
    );
    let _ = writeln!(
        o,
        "\nReproduce: `hack/bench --events {} --rate {} --latency-seconds {}{}{}{}{}`",
        args.events,
        args.rate,
        args.latency_seconds,
        if args.rounds != 3 {
            format!(" --rounds {}", args.rounds)
        } else {
            String::new()
        },
        if args.polling_workers > 1 {
            format!(" --polling-workers {}", args.polling_workers)
        } else {
            String::new()
        },
        if args.compression != "lz4" {
            format!(" --compression {}", args.compression)
        } else {
            String::new()
        },
        if args.payload != Payload::Order {
            format!(" --payload {}", args.payload.name())
        } else {
            String::new()
        }
    );
    o
}
