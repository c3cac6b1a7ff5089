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
//!
//! Each phase lives in a module of its own, so it can be read and changed alone:
//! `setup` (servers, the outbox table, writing WAL), `drain` (the relay worker and
//! `pg_recvlogical`), `polling` (the polling baseline), `latency`, `messages` (the
//! tableless outbox: WAL per event and drain rate next to the table's), `cpu` (who burnt
//! the CPU during a phase) and `report` (targets, ratios, the PASS/MISS table).
//! This file holds the options and `run`, which puts the phases in order.
//! With `--with-debezium`, `debezium` adds Kafka Connect with Debezium's outbox
//! router as a further baseline, in each round and after the latency phase.
#![forbid(unsafe_code)]

mod contention;
mod cpu;
mod debezium;
mod drain;
mod latency;
mod messages;
mod poll_mode;
mod polling;
mod report;
mod setup;

use std::path::PathBuf;
use std::time::Instant;

use outbox_operator::relay::config::{Credentials, RelayConfig};
use outbox_testbed::{Components, Kafka, Postgres};

use cpu::{CpuSample, find_kafka_pid};
use drain::{Worker, drain_timeout, recvlogical, steady_rate, wait_confirmed};
use latency::latency;
use polling::{poll_ddl, polling};
use report::{Results, Round, report};
use setup::{
    Payload, checkpoint, current_lsn, kafka_log_bytes, machine_facts, preload, provision, relay_spec, topic_records,
    tune_postgres, warm_up_kafka,
};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DB: &str = "bench";
const LATENCY_TOPIC: &str = "bench.latency";
const LATENCY_SLOT: &str = "bench_latency";
const LATENCY_SLOT_HIGH: &str = "bench_latency_high";

/// The outbox table the relay reads, as in the integration tests.
use outbox_testbed::OUTBOX_DDL;

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
    /// Also measure Kafka Connect with Debezium (debezium/).
    with_debezium: bool,
    /// Debezium's poll.interval.ms; its own default (500) when not given.
    debezium_poll_ms: Option<u64>,
    /// Quota and hog rounds, and small transactions under the quota (contention.rs).
    contention: bool,
    quota_millicores: u64,
    hogs: Option<usize>,
    small_events: i64,
    high_rate: u64,
}

const USAGE: &str = "usage: relay_throughput [--events N] [--rate R] [--latency-seconds S] [--warmup-seconds W] \
[--batch B] [--partitions P] [--polling-workers K] [--compression C] [--payload order|hex] [--rounds K] [--out FILE] [--dump-latencies CSV] \
[--contention] [--quota-millicores M] [--hogs K] [--small-events N] [--high-rate R] [--with-debezium] [--debezium-poll-interval-ms MS]";

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
            with_debezium: false,
            debezium_poll_ms: None,
            contention: false,
            quota_millicores: 500,
            hogs: None,
            small_events: 50_000,
            high_rate: 10_000,
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
            if key == "--with-debezium" {
                a.with_debezium = true;
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
                "--debezium-poll-interval-ms" => a.debezium_poll_ms = Some(num(value()?)?),
                "--contention" => a.contention = true,
                "--quota-millicores" => a.quota_millicores = num(value()?)?,
                "--hogs" => a.hogs = Some(num(value()?)? as usize),
                "--small-events" => a.small_events = num(value()?)? as i64,
                "--high-rate" => a.high_rate = num(value()?)?,
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
    let dbz = match args.with_debezium {
        true => Some(debezium::Debezium::prepare(&args, &components, &pg, &kafka, &sql, dir.path()).await?),
        false => None,
    };
    let mut dbz_results = debezium::DebeziumResults::default();
    let bed = contention::Bed {
        args: &args,
        pg: &pg,
        kafka: &kafka,
        sql: &sql,
        kafka_pid,
        creds: &creds,
        dir: dir.path(),
    };
    let mut contended = Vec::new();
    for i in 0..if args.contention { args.rounds } else { 0 } {
        let quota = contention::prepare(&bed, &format!("quota.{i}")).await?;
        contended.push((quota, contention::prepare(&bed, &format!("hog.{i}")).await?));
    }
    let mut c = contention::ContentionResults::default();
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
            None,
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

        if let Some(d) = &dbz {
            log(format!("{tag}: draining with Kafka Connect and Debezium"));
            dbz_results
                .rounds
                .push(d.drain(&pg, &kafka, i, args.events, kafka_pid).await?);
            checkpoint(&sql).await?;
        }
        r.rounds.push(round);
    }
    contention::rounds(&bed, &contended, (lsn0, lsn1), &mut c).await?;
    if args.small_events > 0 {
        contention::small_transactions(&bed, &mut c).await?;
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
    if let Some(d) = &dbz {
        dbz_results.lat = d.latency(&args, &pg, &sql, kafka_pid).await?;
    }
    if args.high_rate > 0 {
        let spec = relay_spec(&pg, &kafka, &args.compression, LATENCY_SLOT_HIGH, LATENCY_TOPIC)?;
        let cfg = RelayConfig::from_spec("bench", "bench", &spec, &creds)?;
        provision(&cfg, &spec, &pg).await?;
        let mut worker = Worker::spawn(&spec, &creds, dir.path())?;
        log(format!(
            "offering {} events/s for {} s",
            args.high_rate, args.latency_seconds
        ));
        let high = Args {
            rate: args.high_rate,
            dump_latencies: None,
            ..args.clone()
        };
        c.high_rate = Some(latency(&high, &pg, &kafka.bootstrap(), &sql, &cfg.slot, &mut worker, kafka_pid).await?);
        worker.stop().await;
    }

    // The tableless outbox last: it deletes the outbox rows it measures the delete of.
    let mut rates: Vec<f64> = r.rounds.iter().map(|round| round.relay.rate()).collect();
    rates.sort_by(f64::total_cmp);
    let table_rate = rates.get(rates.len() / 2).copied().unwrap_or_default();
    let m = messages::messages_phase(
        &args,
        &pg,
        &kafka,
        &sql,
        &creds,
        dir.path(),
        r.insert_wal_per_event,
        table_rate,
    )
    .await?;

    log("draining with the relay's polling mode");
    let pm = poll_mode::poll_mode_phase(&args, &pg, &kafka, &sql, &creds, dir.path()).await?;
    let median_of = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = r.rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let n = args.events as f64;
    let pm_section = poll_mode::section(
        &pm,
        args.rate,
        table_rate,
        median_of(&|x| x.poll.rate()),
        median_of(&|x| x.relay_extra_wal as f64 / n),
        median_of(&|x| x.poll_extra_wal as f64 / n),
    );

    let mut report = format!(
        "{}\n{}\n{}\n{}",
        report(&args, &r, &machine, started.elapsed()),
        messages::section(&m),
        pm_section,
        contention::section(&c, &r.rounds, &r.lat),
    );
    if dbz.is_some() {
        report.push_str(&debezium::section(&args, &r, &dbz_results));
    }
    println!("\n{report}");
    if let Some(path) = &args.out {
        std::fs::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
