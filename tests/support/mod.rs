//! Shared helpers of the relay integration tests: an outbox database per test,
//! a topic per test, events with per-aggregate sequence numbers, a consumer
//! that reads a topic back, and the order check.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_operator::api::OutboxRelaySpec;
use outbox_operator::postgres::{self, PgConnectConfig, QualifiedTable};
use outbox_operator::relay::config::{Credentials, RelayConfig, Tuning};
use outbox_operator::relay::worker::{self, RelayHandle};
use outbox_testbed::{Kafka, Postgres, unique_name};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

use outbox_testbed::OUTBOX_DDL;

/// One test's database, topic and relay definition.
#[derive(Clone)]
pub struct Fixture {
    pub name: String,
    pub db: String,
    pub topic: String,
    pub spec: OutboxRelaySpec,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub pg_password: String,
    pub bootstrap: String,
}

impl Fixture {
    /// Creates a database with the outbox table, a topic, and provisions the
    /// publication and slot exactly as the operator does.
    pub async fn new(pg: &Postgres, kafka: &Kafka, prefix: &str, partitions: i32) -> Fixture {
        Self::with_ddl(pg, kafka, prefix, partitions, OUTBOX_DDL).await
    }

    /// [`Self::new`] with the outbox table (`public.outbox`) made by `ddl`, e.g. a
    /// partitioned one.
    pub async fn with_ddl(pg: &Postgres, kafka: &Kafka, prefix: &str, partitions: i32, ddl: &str) -> Fixture {
        let fx = Self::unprovisioned(pg, kafka, prefix, partitions, ddl).await;
        fx.provision().await;
        fx
    }

    /// [`Self::with_ddl`] without the publication and slot (a polling relay needs
    /// neither, and a server without `wal_level = logical` could not make them).
    pub async fn unprovisioned(pg: &Postgres, kafka: &Kafka, prefix: &str, partitions: i32, ddl: &str) -> Fixture {
        let name = unique_name(prefix);
        let db = name.replace('-', "_");
        pg.create_database(&db).await.expect("create database");
        let client = pg.client(&db).await.expect("connect");
        client.batch_execute(ddl).await.expect("create outbox table");
        let topic = format!("{name}.events");
        kafka.create_topic(&topic, partitions).await.expect("create topic");
        let spec: OutboxRelaySpec = serde_json::from_value(serde_json::json!({
            "database": {
                "host": pg.host(), "port": pg.port(), "database": db,
                "tls": {"mode": "Disable"},
                "credentialsSecretRef": {"name": "unused-in-tests"}
            },
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": kafka.bootstrap(), "topic": topic,
                      "producer": {"lingerMs": 2}}
        }))
        .expect("spec");
        Fixture {
            name,
            db,
            topic,
            spec,
            pg_host: pg.host().to_string(),
            pg_port: pg.port(),
            pg_user: pg.user().to_string(),
            pg_password: pg.password().to_string(),
            bootstrap: kafka.bootstrap(),
        }
    }

    pub fn sql_config(&self) -> PgConnectConfig {
        PgConnectConfig {
            host: self.pg_host.clone(),
            port: self.pg_port,
            dbname: self.db.clone(),
            user: self.pg_user.clone(),
            password: Some(self.pg_password.clone()),
            ssl_mode: outbox_operator::api::PgSslMode::Disable,
            ca_pem: None,
            application_name: "outbox-tests".into(),
            allow_cleartext_password: false,
        }
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        postgres::connect(&self.sql_config()).await.expect("sql connect")
    }

    /// Publication and slot, as the operator provisions them.
    pub async fn provision(&self) {
        let cfg = self.config();
        let client = self.sql().await;
        let table = QualifiedTable::parse(&self.spec.outbox.table).expect("table");
        postgres::check_prerequisites(&client, &table, &self.spec.outbox.columns, &cfg.slot)
            .await
            .expect("prerequisites");
        postgres::ensure_publication(&client, &cfg.publication, &table)
            .await
            .expect("publication");
        postgres::ensure_slot(&client, &cfg.slot).await.expect("slot");
    }

    pub fn credentials(&self) -> Credentials {
        Credentials {
            db_username: self.pg_user.clone(),
            db_password: Some(self.pg_password.clone()),
            ..Credentials::default()
        }
    }

    /// Worker configuration with test-friendly timings.
    pub fn config(&self) -> RelayConfig {
        let mut cfg = RelayConfig::from_spec("tests", &self.name, &self.spec, &self.credentials()).expect("config");
        cfg.tuning = Tuning {
            stall_after: Duration::from_secs(3),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            standby_poll: Duration::from_millis(300),
            ..Tuning::default()
        };
        cfg
    }

    /// Starts a worker inside this process.
    pub fn start_worker(&self) -> RunningWorker {
        self.start_worker_with(self.config())
    }

    pub fn start_worker_with(&self, cfg: RelayConfig) -> RunningWorker {
        let handle = RelayHandle::new();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(worker::run(cfg, handle.clone(), rx));
        RunningWorker { handle, stop: tx, task }
    }

    /// Starts the worker binary as a child process (for crash tests).
    pub fn spawn_worker_process(&self, dir: &Path) -> Child {
        self.spawn_worker_process_on(dir, "127.0.0.1:0")
    }

    /// [`Self::spawn_worker_process`] with its HTTP endpoints on `listen`.
    pub fn spawn_worker_process_on(&self, dir: &Path, listen: &str) -> Child {
        let spec_path = dir.join(format!("{}.yaml", self.name));
        let doc = serde_json::json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
            "metadata": {"name": self.name, "namespace": "tests"},
            "spec": self.spec,
        });
        std::fs::write(&spec_path, serde_json::to_string(&doc).expect("json")).expect("write spec");
        Command::new(env!("CARGO_BIN_EXE_outbox-operator"))
            .args(["--log-format", "text", "relay", "--listen", listen, "--spec"])
            .arg(&spec_path)
            .env("OUTBOX_DB_USERNAME", &self.pg_user)
            .env("OUTBOX_DB_PASSWORD", &self.pg_password)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn worker")
    }

    /// Inserts `per_aggregate` events for each of `aggregates` aggregates, in
    /// transactions of `per_txn` rows. Payload `{"seq": n}` numbers each
    /// aggregate's events from 1 in commit order. Returns the event ids.
    pub async fn insert_events(
        &self,
        client: &tokio_postgres::Client,
        aggregates: usize,
        per_aggregate: usize,
        per_txn: usize,
    ) -> Vec<String> {
        self.insert_events_from(client, aggregates, per_aggregate, per_txn, 1)
            .await
    }

    /// [`Self::insert_events`] with each aggregate's numbering starting at `first_seq`,
    /// for writers that insert in several rounds.
    pub async fn insert_events_from(
        &self,
        client: &tokio_postgres::Client,
        aggregates: usize,
        per_aggregate: usize,
        per_txn: usize,
        first_seq: usize,
    ) -> Vec<String> {
        let total = aggregates * per_aggregate;
        let mut ids = Vec::with_capacity(total);
        let mut n = 0;
        while n < total {
            let rows = per_txn.min(total - n);
            // Row i goes to aggregate i % aggregates with seq i / aggregates + 1,
            // so every aggregate's sequence grows in commit order.
            let sql = format!(
                "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
                 SELECT 'Order', 'agg-' || (i % {aggregates}), 'OrderCreated',
                        jsonb_build_object('seq', i / {aggregates} + {first_seq}, 'pad', repeat('x', 64))
                 FROM generate_series({n}, {}) AS i ORDER BY i RETURNING id::text",
                n + rows - 1
            );
            let out = client.query(sql.as_str(), &[]).await.expect("insert events");
            ids.extend(out.iter().map(|r| r.get::<_, String>(0)));
            n += rows;
        }
        ids
    }

    pub async fn slot_confirmed_flush(&self) -> Option<String> {
        let client = self.sql().await;
        let cfg = self.config();
        postgres::slot_status(&client, &cfg.slot)
            .await
            .expect("slot status")
            .and_then(|s| s.confirmed_flush_lsn)
    }
}

pub struct RunningWorker {
    pub handle: RelayHandle,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops within 30s")
            .expect("worker task");
    }
}

/// One record read back from Kafka.
#[derive(Clone, Debug)]
pub struct Consumed {
    pub key: Option<String>,
    pub id: Option<String>,
    pub event_type: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub payload: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    /// The record timestamp in milliseconds since 1970, if it has one.
    pub timestamp: Option<i64>,
}

impl Consumed {
    pub fn seq(&self) -> i64 {
        let v: serde_json::Value =
            serde_json::from_slice(self.payload.as_deref().unwrap_or(b"null")).unwrap_or_default();
        v.get("seq").and_then(|s| s.as_i64()).unwrap_or(-1)
    }
}

/// Reads `topic` from the beginning until every id in `expect` was seen (or
/// `timeout`), then for `settle` more to catch extra records. Blocking: call it
/// through `spawn_blocking` when a worker runs in the same runtime.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    settle: Duration,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || settle_until.is_some_and(|s| now > s) {
            break;
        }
        if settle_until.is_none() && expect.iter().all(|id| seen.contains(id)) {
            settle_until = Some(now + settle);
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                let id = headers.get("id").cloned();
                if let Some(id) = &id {
                    seen.insert(id.clone());
                }
                out.push(Consumed {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    event_type: headers.get("type").cloned(),
                    id,
                    headers,
                    payload: m.payload().map(<[u8]>::to_vec),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => panic!("consuming {topic}: {e}"),
            None => {}
        }
    }
    out
}

pub async fn consume_async(
    bootstrap: &str,
    topic: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    settle: Duration,
) -> Vec<Consumed> {
    let (b, t, e) = (bootstrap.to_string(), topic.to_string(), expect.clone());
    tokio::task::spawn_blocking(move || consume(&b, &t, &e, timeout, settle))
        .await
        .expect("consumer task")
}

/// Every expected id arrived at least once.
pub fn assert_all_delivered(records: &[Consumed], expect: &HashSet<String>) {
    let seen: HashSet<&str> = records.iter().filter_map(|r| r.id.as_deref()).collect();
    let missing: Vec<&String> = expect.iter().filter(|id| !seen.contains(id.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} of {} events never arrived (e.g. {:?}); {} records read",
        missing.len(),
        expect.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        records.len()
    );
}

/// Per-key order under at-least-once: within each key's partition, reading in
/// offset order, every `seq` is at most one more than the highest seen so far
/// (a replayed tail may repeat earlier numbers, but nothing may jump ahead of an
/// event that has not arrived yet), and each key lives in one partition.
pub fn check_per_key_order(records: &[Consumed]) -> Result<(), String> {
    let mut by_key: HashMap<&str, Vec<&Consumed>> = HashMap::new();
    for r in records {
        if let Some(k) = r.key.as_deref() {
            by_key.entry(k).or_default().push(r);
        }
    }
    for (key, mut recs) in by_key {
        let partitions: HashSet<i32> = recs.iter().map(|r| r.partition).collect();
        if partitions.len() != 1 {
            return Err(format!("key {key} spread over partitions {partitions:?}"));
        }
        recs.sort_by_key(|r| r.offset);
        let mut max = 0;
        for r in recs {
            let s = r.seq();
            if s > max + 1 {
                return Err(format!(
                    "key {key}: seq {s} at offset {} arrived before seq {}",
                    r.offset,
                    max + 1
                ));
            }
            max = max.max(s);
        }
    }
    Ok(())
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    outbox_testbed::free_port().expect("free port")
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
