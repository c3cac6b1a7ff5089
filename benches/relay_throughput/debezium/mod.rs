//! The Debezium baseline (`--with-debezium`): Kafka Connect in standalone mode
//! running Debezium's PostgreSQL connector with its outbox event router, as
//! Debezium's outbox documentation sets it up, over the same WAL (a `pgoutput`
//! slot per round, created before the outbox preload like the relay's), into the
//! same broker, with the relay's producer settings as far as Connect takes them.
//!
//! It measures what the relay's phases measure, from the JVM's process start: the
//! drain of the backlog until every record is on the topic, the time to the first
//! record, the insert→append latency at the offered rate, and the JVM's peak RSS
//! and CPU seconds. `report::section` puts them next to the relay's figures of
//! the same run, as ratios.
//!
//! The jars come from `hack/debezium fetch` (run by `hack/bench --with-debezium`),
//! named by OUTBOX_BENCH_CONNECT_LIBS and OUTBOX_BENCH_DEBEZIUM_PLUGINS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_testbed::{Components, Kafka, Postgres, free_port};
use rdkafka::consumer::BaseConsumer;

use crate::cpu::{Cpu, CpuSample, proc_cpu_secs};
use crate::drain::{Drain, drain_timeout, steady_rate};
use crate::latency::{offer, read_latencies};
use crate::setup::{consumer, insert_sql, kafka_log_bytes, partition_offsets};
use crate::{Args, DB, Res, log};

mod report;
pub use report::section;

/// What hack/debezium fetches; printed in the report.
pub(crate) const DEBEZIUM_VERSION: &str = "3.6.1.Final";
pub(crate) const CONNECT_VERSION: &str = "4.3.0";
const PUBLICATION: &str = "bench_debezium";
const LATENCY_SLOT: &str = "bench_debezium_latency";
const LATENCY_TOPIC: &str = "bench.debezium.latency";
const WATCH_POLL: Duration = Duration::from_millis(50);

fn drain_slot(round: usize) -> String {
    format!("bench_debezium_{round}")
}

fn drain_topic(round: usize) -> String {
    format!("bench.debezium.{round}")
}

/// One drain of the backlog by Connect and Debezium.
#[derive(Clone, Debug, Default)]
pub struct DebeziumDrain {
    pub drain: Drain,
    /// Seconds from the JVM's start to the first record on the topic.
    pub first_record: Option<f64>,
    /// The JVM's CPU seconds by then: what start-up cost.
    pub first_record_cpu: f64,
    pub rss_kib: u64,
    /// The topic's log segments on the broker's disk after the drain.
    pub log_bytes: u64,
}

/// The latency phase of the baseline: insert→broker append, exact per event.
#[derive(Clone, Debug, Default)]
pub struct DebeziumLatency {
    pub offered: u64,
    pub offered_secs: f64,
    /// From the JVM's start to the first probe row on the topic (no backlog).
    pub first_record: f64,
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu: Cpu,
    pub rss_kib: u64,
}

#[derive(Clone, Debug, Default)]
pub struct DebeziumResults {
    pub rounds: Vec<DebeziumDrain>,
    pub lat: DebeziumLatency,
}

/// What every start of Connect needs: jars, servers, and the producer settings.
pub struct Debezium {
    java: PathBuf,
    connect_libs: PathBuf,
    plugins: PathBuf,
    bootstrap: String,
    pg_host: String,
    pg_port: u16,
    pg_user: String,
    pg_password: String,
    compression: String,
    partitions: i32,
    poll_ms: Option<u64>,
    dir: PathBuf,
}

fn env_dir(name: &str) -> Res<PathBuf> {
    let dir = std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{name} is not set: run the bench through `hack/bench --with-debezium`"))?;
    if !dir.is_dir() {
        return Err(format!("{name}={} is not a directory: run `hack/debezium fetch`", dir.display()).into());
    }
    Ok(dir)
}

impl Debezium {
    /// Publication, one slot per round and the topics. Runs before the outbox
    /// preload: a slot holds only the WAL written after it, and pgoutput looks the
    /// publication up in the catalog as of each change it decodes, so a
    /// publication created after the rows would not see them.
    pub async fn prepare(
        args: &Args,
        components: &Components,
        pg: &Postgres,
        kafka: &Kafka,
        sql: &tokio_postgres::Client,
        dir: &Path,
    ) -> Res<Self> {
        let d = Self {
            java: components.java.clone(),
            connect_libs: env_dir("OUTBOX_BENCH_CONNECT_LIBS")?,
            plugins: env_dir("OUTBOX_BENCH_DEBEZIUM_PLUGINS")?,
            bootstrap: kafka.bootstrap(),
            pg_host: pg.host().to_string(),
            pg_port: pg.port(),
            pg_user: pg.user().to_string(),
            pg_password: pg.password().to_string(),
            compression: args.compression.clone(),
            partitions: args.partitions,
            poll_ms: args.debezium_poll_ms,
            dir: dir.join("debezium"),
        };
        std::fs::create_dir_all(&d.dir)?;
        sql.batch_execute(&format!("CREATE PUBLICATION {PUBLICATION} FOR TABLE public.outbox"))
            .await?;
        let mut topics = vec![LATENCY_TOPIC.to_string()];
        for round in 0..args.rounds {
            sql.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&drain_slot(round)],
            )
            .await?;
            topics.push(drain_topic(round));
        }
        for topic in &topics {
            kafka
                .create_topic_with_config(topic, args.partitions, &[("message.timestamp.type", "LogAppendTime")])
                .await?;
        }
        Ok(d)
    }

    /// Starts Connect with a worker config and the outbox connector's config.
    fn spawn(&self, name: &str, slot: &str, topic: &str) -> Res<Connect> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let rest_port = free_port()?;
        // The relay's producer settings (acks=all, idempotence, five requests in
        // flight, lz4, linger 5 ms). librdkafka batches up to 1 MB per partition by
        // default; the Java producer's 16 KiB default would send far smaller
        // batches, so batch.size is raised to match. String converters: the key is
        // the aggregate id and the value the payload's JSON text, byte for byte what
        // the relay writes. plugin.discovery=service_load: Connect's own start-up
        // warning recommends it when every plugin has ServiceLoader manifests, as
        // Debezium's do; the default (hybrid) also scans every class by reflection,
        // 6–7 s more on two busy cores. Offsets flush every second so the slot's
        // confirmed position follows closely; nothing here waits for it.
        let worker = format!(
            "bootstrap.servers={bootstrap}\n\
             listeners=http://127.0.0.1:{rest_port}\n\
             plugin.path={plugins}\n\
             plugin.discovery=service_load\n\
             offset.storage.file.filename={offsets}\n\
             offset.flush.interval.ms=1000\n\
             key.converter=org.apache.kafka.connect.storage.StringConverter\n\
             value.converter=org.apache.kafka.connect.storage.StringConverter\n\
             header.converter=org.apache.kafka.connect.storage.StringConverter\n\
             producer.acks=all\n\
             producer.enable.idempotence=true\n\
             producer.max.in.flight.requests.per.connection=5\n\
             producer.compression.type={compression}\n\
             producer.linger.ms=5\n\
             producer.batch.size=1000000\n",
            bootstrap = self.bootstrap,
            plugins = self.plugins.display(),
            offsets = dir.join("offsets").display(),
            compression = self.compression,
        );
        // As Debezium's outbox documentation sets it up: pgoutput, the outbox table
        // only, the EventRouter routing by aggregatetype with aggregateid as key and
        // the event id in a header, the type column as a header too (the relay sends
        // both), no tombstones. snapshot.mode=no_data: the rows are streamed from the
        // slot, not read from the table. The publication exists already (see
        // `prepare`), so autocreate is off.
        let connector = format!(
            "name=outbox-{name}\n\
             connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             tasks.max=1\n\
             database.hostname={host}\n\
             database.port={port}\n\
             database.user={user}\n\
             database.password={password}\n\
             database.dbname={DB}\n\
             database.sslmode=disable\n\
             topic.prefix=bench\n\
             plugin.name=pgoutput\n\
             slot.name={slot}\n\
             publication.name={PUBLICATION}\n\
             publication.autocreate.mode=disabled\n\
             snapshot.mode=no_data\n\
             table.include.list=public.outbox\n\
             tombstones.on.delete=false\n\
             transforms=outbox\n\
             transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n\
             transforms.outbox.route.by.field=aggregatetype\n\
             transforms.outbox.table.field.event.id=id\n\
             transforms.outbox.table.field.event.key=aggregateid\n\
             transforms.outbox.table.field.event.payload=payload\n\
             transforms.outbox.table.fields.additional.placement=type:header:type\n\
             transforms.outbox.route.topic.replacement={topic}\n\
             {poll}",
            // Unset unless asked for: the documented default (500 ms) is what an
            // outbox set up from the documentation runs with.
            poll = self
                .poll_ms
                .map_or(String::new(), |ms| format!("poll.interval.ms={ms}\n")),
            host = self.pg_host,
            port = self.pg_port,
            user = self.pg_user,
            password = self.pg_password,
        );
        let log4j = "status = warn\n\
                     appender.out.type = Console\n\
                     appender.out.name = OUT\n\
                     appender.out.layout.type = PatternLayout\n\
                     appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
                     rootLogger.level = INFO\n\
                     rootLogger.appenderRef.out.ref = OUT\n";
        std::fs::write(dir.join("worker.properties"), worker)?;
        std::fs::write(dir.join("connector.properties"), connector)?;
        std::fs::write(dir.join("log4j2.properties"), log4j)?;
        let log = dir.join("connect.log");
        let out = std::fs::File::create(&log)?;
        let mut classpath = self.connect_libs.clone().into_os_string();
        classpath.push("/*");
        // Heap and GC flags of Kafka's connect-standalone.sh (KAFKA_HEAP_OPTS and
        // KAFKA_JVM_PERFORMANCE_OPTS), as Connect is usually started.
        let child = Command::new(&self.java)
            .args([
                "-Xms256M",
                "-Xmx2G",
                "-server",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
            ])
            .args([
                "-XX:InitiatingHeapOccupancyPercent=35",
                "-XX:+ExplicitGCInvokesConcurrent",
            ])
            .args(["-XX:MaxInlineLevel=15", "-Djava.awt.headless=true"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(classpath)
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(dir.join("worker.properties"))
            .arg(dir.join("connector.properties"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Connect { child, log })
    }

    /// Drains round `round`'s backlog: Connect from its start until the topic
    /// holds `events` records.
    pub async fn drain(
        &self,
        pg: &Postgres,
        kafka: &Kafka,
        round: usize,
        events: i64,
        kafka_pid: u32,
    ) -> Res<DebeziumDrain> {
        let topic = drain_topic(round);
        let watch = TopicWatch::new(&self.bootstrap, &topic, self.partitions)?;
        let base = watch.records()?;
        let before = CpuSample::take(pg, kafka_pid)?;
        let t = Instant::now();
        let mut connect = self.spawn(&format!("round-{round}"), &drain_slot(round), &topic)?;
        let deadline = t + drain_timeout(events);
        let mut progress = Vec::new();
        let mut first_record = None;
        let mut first_record_cpu = 0.0;
        loop {
            let n = watch.records()? - base;
            let at = t.elapsed().as_secs_f64();
            progress.push((at, n));
            if first_record.is_none() && n > 0 {
                first_record = Some(at);
                first_record_cpu = connect.cpu_secs();
            }
            if n >= events {
                break;
            }
            connect.check_running()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "{topic} holds {n} of {events} records after {:?}; Connect's log:\n{}",
                    drain_timeout(events),
                    connect.log_tail()
                )
                .into());
            }
            tokio::time::sleep(WATCH_POLL).await;
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = CpuSample::take(pg, kafka_pid)?.since(&before, connect.cpu_secs());
        let rss_kib = connect.peak_rss_kib()?;
        connect.stop().await;
        if round == 0 {
            match describe_a_record(&self.bootstrap, &topic, self.partitions) {
                Ok(d) => log(format!("debezium: a record of {topic}: {d}")),
                Err(e) => log(format!("debezium: could not read back a record of {topic}: {e}")),
            }
        }
        Ok(DebeziumDrain {
            drain: Drain {
                secs,
                events,
                cpu,
                steady: steady_rate(&progress, 0, events, events),
            },
            first_record,
            first_record_cpu,
            rss_kib,
            log_bytes: kafka_log_bytes(kafka, &topic),
        })
    }

    /// Latency at the offered rate, as the relay's latency phase measures it, on
    /// a slot created now (no backlog). Connect is running when the load starts:
    /// probe rows go in until one reaches the topic.
    pub async fn latency(
        &self,
        args: &Args,
        pg: &Postgres,
        sql: &tokio_postgres::Client,
        kafka_pid: u32,
    ) -> Res<DebeziumLatency> {
        sql.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&LATENCY_SLOT],
        )
        .await?;
        let watch = TopicWatch::new(&self.bootstrap, LATENCY_TOPIC, self.partitions)?;
        let start_offsets = partition_offsets(&self.bootstrap, LATENCY_TOPIC).await?;
        let base: i64 = start_offsets.iter().sum();
        let writer = pg.client(DB).await?;
        let stmt = writer
            .prepare(&insert_sql(
                args.payload,
                "public.outbox",
                "(SELECT $1::int8 AS i) AS s",
            ))
            .await?;
        // Numbers no other phase uses, so these rows are told apart if ever needed.
        let mut seq: i64 = 3_000_000_000;
        let t = Instant::now();
        let mut connect = self.spawn("latency", LATENCY_SLOT, LATENCY_TOPIC)?;
        let deadline = t + Duration::from_secs(180);
        let mut probes = 0i64;
        let first_record = loop {
            writer.execute(&stmt, &[&seq]).await?;
            seq += 1;
            probes += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if watch.records()? > base {
                break t.elapsed().as_secs_f64();
            }
            connect.check_running()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "no probe row reached {LATENCY_TOPIC} in 180 s; log:\n{}",
                    connect.log_tail()
                )
                .into());
            }
        };
        log(format!(
            "debezium: streaming {first_record:.1} s after its start; offering {} events/s for {} s",
            args.rate, args.latency_seconds
        ));
        let writers = [(writer, stmt)];
        let warm = offer(&writers, args.rate, args.warmup_seconds, seq).await?;
        seq += warm as i64;
        let boundary_us = unix_micros();
        let before = CpuSample::take(pg, kafka_pid)?;
        let cpu0 = connect.cpu_secs();
        let t = Instant::now();
        let total = offer(&writers, args.rate, args.latency_seconds, seq).await?;
        let offered_secs = t.elapsed().as_secs_f64();
        // Every offered row on the topic, bounded like the relay's wait.
        let want = base + probes + warm as i64 + total as i64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while watch.records()? < want {
            connect.check_running()?;
            if Instant::now() > deadline {
                return Err(format!("{LATENCY_TOPIC} did not reach {want} records in 120 s").into());
            }
            tokio::time::sleep(WATCH_POLL).await;
        }
        let cpu = CpuSample::take(pg, kafka_pid)?.since(&before, connect.cpu_secs() - cpu0);
        let rss_kib = connect.peak_rss_kib()?;
        connect.stop().await;

        let mut samples = read_latencies(&self.bootstrap, LATENCY_TOPIC, start_offsets).await?;
        samples.retain(|s| s.0 >= boundary_us);
        let mut lat: Vec<f64> = samples.iter().map(|s| s.2).collect();
        lat.sort_by(f64::total_cmp);
        Ok(DebeziumLatency {
            offered: total,
            offered_secs,
            first_record,
            count: lat.len(),
            p50_ms: percentile(&lat, 0.50),
            p99_ms: percentile(&lat, 0.99),
            max_ms: lat.last().copied().unwrap_or(f64::NAN),
            cpu,
            rss_kib,
        })
    }
}

/// The q-quantile of sorted samples (nearest rank), as the relay's phase takes it.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((q * sorted.len() as f64).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// One record as Connect wrote it, for the log (key, header names, the value's
/// start): shows that the router produced what the relay produces.
fn describe_a_record(bootstrap: &str, topic: &str, partitions: i32) -> Res<String> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::{Headers, Message};
    let c = consumer(bootstrap)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let Some(m) = c.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m?;
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let headers: Vec<String> = m
                .headers()
                .map(|h| h.iter().map(|h| h.key.to_string()).collect())
                .unwrap_or_default();
            let value: String = String::from_utf8_lossy(m.payload().unwrap_or_default())
                .chars()
                .take(60)
                .collect();
            return Ok(format!("key {key:?}, headers [{}], value {value}…", headers.join(", ")));
        }
        Err("no record within 10 s".into())
    })
}

/// The records on a topic (sum of its high watermarks), with one consumer kept
/// for the phase: a new client per poll would cost more than the poll.
struct TopicWatch {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl TopicWatch {
    fn new(bootstrap: &str, topic: &str, partitions: i32) -> Res<Self> {
        Ok(Self {
            consumer: consumer(bootstrap)?,
            topic: topic.to_string(),
            partitions,
        })
    }

    fn records(&self) -> Res<i64> {
        use rdkafka::consumer::Consumer;
        // A few loopback round trips; the runtime has a second worker thread for
        // everything else meanwhile.
        tokio::task::block_in_place(|| {
            (0..self.partitions)
                .map(|p| {
                    Ok(self
                        .consumer
                        .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?
                        .1)
                })
                .sum()
        })
    }
}

/// The Connect JVM. Dropping it kills the process, so a failed run never leaves
/// it streaming from a slot.
struct Connect {
    child: Child,
    log: PathBuf,
}

impl Connect {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.pid(), false).unwrap_or(0.0)
    }

    fn peak_rss_kib(&self) -> Res<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| "no VmHWM in /proc/PID/status".into())
    }

    fn check_running(&mut self) -> Res<()> {
        match self.child.try_wait()? {
            Some(status) => Err(format!("Kafka Connect exited ({status}); its log:\n{}", self.log_tail()).into()),
            None => Ok(()),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM (Connect stops its task and commits offsets), SIGKILL after 20 s.
    async fn stop(&mut self) {
        crate::drain::stop_gracefully(&mut self.child).await;
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        crate::drain::kill_if_running(&mut self.child);
    }
}
