//! The relay when it does not have the cores to itself, and with transactions of
//! one event each:
//!
//! - *quota*: the worker and `pg_recvlogical` each drain the same backlog inside a
//!   CPU cgroup with a quota (cgroup v1 `cpu.cfs_quota_us`, as a pod's
//!   `limits.cpu` sets it; 500m by default), so the drain rate follows the CPU each
//!   spends per event;
//! - *hog*: the same two drains with busy-loop processes beside the bench (one per
//!   core by default), so every thread competes for a core;
//! - *small transactions*: a backlog written one event per autocommit transaction
//!   at the database's own commit rate, drained by both (quiet, and under the quota
//!   with `--contention`).
//!
//! Each scenario has slots of its own that hold the same WAL as the others, and
//! the ratio is taken within a round, as for the quiet drains. The section also
//! gives the worker's CPU per event against `pg_recvlogical`'s from the quiet
//! rounds, and the latency at the higher offered rate next to the 2k figure.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use outbox_operator::api::OutboxRelaySpec;
use outbox_operator::relay::config::{Credentials, RelayConfig};
use outbox_testbed::{Kafka, Postgres};

use crate::cpu::CpuSample;
use crate::drain::{Drain, Worker, drain_timeout, recvlogical, steady_rate, wait_confirmed};
use crate::latency::Latency;
use crate::report::Round;
use crate::setup::{checkpoint, current_lsn, insert_sql, provision, relay_spec, topic_records};
use crate::{Args, DB, Res, log};

/// A CPU cgroup (v1) with a quota; processes added to it are limited together.
pub struct Cgroup {
    path: PathBuf,
    pub millicores: u64,
}

impl Cgroup {
    pub fn create(name: &str, millicores: u64) -> Res<Self> {
        let path = Path::new("/sys/fs/cgroup/cpu").join(format!("relay-bench-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("creating the cgroup {}: {e}", path.display()))?;
        let period = 100_000;
        std::fs::write(path.join("cpu.cfs_period_us"), period.to_string())?;
        std::fs::write(path.join("cpu.cfs_quota_us"), (millicores * period / 1000).to_string())?;
        Ok(Self { path, millicores })
    }

    /// Moves a process (all its threads, and the ones it starts later) in.
    pub fn add(&self, pid: u32) -> Res<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())?;
        Ok(())
    }
}

impl Drop for Cgroup {
    // Its processes have exited by now; an empty cgroup can be removed.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Busy-loop processes, each bounded in time by `timeout`, stopped on drop.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(count: usize, max: Duration) -> Res<Self> {
        let mut v = Vec::new();
        for _ in 0..count {
            v.push(
                Command::new("timeout")
                    .arg(max.as_secs().to_string())
                    .args(["sh", "-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(Self(v))
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // TERM: `timeout` passes it on to its busy loop.
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }
}

/// What the scenarios share: the servers, the bench's connection and options.
pub struct Bed<'a> {
    pub args: &'a Args,
    pub pg: &'a Postgres,
    pub kafka: &'a Kafka,
    pub sql: &'a tokio_postgres::Client,
    pub kafka_pid: u32,
    pub creds: &'a Credentials,
    pub dir: &'a Path,
}

/// A relay slot and a `pg_recvlogical` slot over the same WAL, and the relay's topic.
pub struct PairSlots {
    spec: OutboxRelaySpec,
    cfg: RelayConfig,
    recv_slot: String,
    topic: String,
}

/// One drain of the same backlog by each.
#[derive(Clone, Debug, Default)]
pub struct Pair {
    pub recv: Drain,
    pub relay: Drain,
}

impl Pair {
    pub fn ratio(&self) -> f64 {
        self.relay.rate() / self.recv.rate()
    }
    /// Worker CPU per event over pg_recvlogical's.
    pub fn cpu_ratio(&self) -> f64 {
        self.relay.cpu.client / self.recv.cpu.client
    }
}

/// Slots (and the relay's topic) for one pair; call before the WAL is written.
pub async fn prepare(bed: &Bed<'_>, name: &str) -> Res<PairSlots> {
    let topic = format!("bench.{name}");
    bed.kafka
        .create_topic_with_config(
            &topic,
            bed.args.partitions,
            &[("message.timestamp.type", "LogAppendTime")],
        )
        .await?;
    let slot = format!("bench_relay_{}", name.replace('.', "_"));
    let spec = relay_spec(bed.pg, bed.kafka, &bed.args.compression, &slot, &topic)?;
    let cfg = RelayConfig::from_spec("bench", "bench", &spec, bed.creds)?;
    provision(&cfg, &spec, bed.pg).await?;
    let recv_slot = format!("bench_recvlogical_{}", name.replace('.', "_"));
    bed.sql
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&recv_slot],
        )
        .await?;
    Ok(PairSlots {
        spec,
        cfg,
        recv_slot,
        topic,
    })
}

/// Drains the WAL from `lsn0` to `lsn1` (`events` events) with `pg_recvlogical`,
/// then with the worker, each inside `cgroup` if given.
pub async fn drain_pair(
    bed: &Bed<'_>,
    s: &PairSlots,
    (lsn0, lsn1): (i64, i64),
    events: i64,
    cgroup: Option<&Cgroup>,
) -> Res<Pair> {
    let out = bed.dir.join("recvlogical-contention.out");
    let recv = recvlogical(
        bed.pg,
        bed.sql,
        &s.recv_slot,
        &s.cfg.publication,
        lsn1,
        &out,
        events,
        bed.kafka_pid,
        cgroup,
    )
    .await?;
    let _ = std::fs::remove_file(&out);
    checkpoint(bed.sql).await?;

    let before = CpuSample::take(bed.pg, bed.kafka_pid)?;
    let t = Instant::now();
    let mut worker = Worker::spawn(&s.spec, bed.creds, bed.dir)?;
    if let Some(cg) = cgroup {
        cg.add(worker.pid())?;
    }
    let progress = wait_confirmed(bed.sql, &s.cfg.slot, lsn1, &mut worker, drain_timeout(events) * 4, t).await?;
    let relay = Drain {
        secs: t.elapsed().as_secs_f64(),
        events,
        cpu: CpuSample::take(bed.pg, bed.kafka_pid)?.since(&before, worker.cpu_secs()),
        steady: steady_rate(&progress, lsn0, lsn1, events),
    };
    worker.stop().await;
    let records = topic_records(&bed.kafka.bootstrap(), &s.topic).await?;
    if records < events {
        return Err(format!("{} holds {records} records, fewer than the {events} events", s.topic).into());
    }
    checkpoint(bed.sql).await?;
    Ok(Pair { recv, relay })
}

/// Everything this module reports.
#[derive(Default, Debug)]
pub struct ContentionResults {
    pub millicores: u64,
    pub hogs: usize,
    /// Per round, with `--contention`.
    pub quota: Vec<Pair>,
    pub hog: Vec<Pair>,
    pub small_events: i64,
    pub small_commit_rate: f64,
    pub small_quiet: Vec<Pair>,
    pub small_quota: Vec<Pair>,
    pub high_rate: Option<Latency>,
}

/// The rounds of the quota and hog scenarios, over the backlog the quiet rounds drain.
pub async fn rounds(
    bed: &Bed<'_>,
    slots: &[(PairSlots, PairSlots)],
    lsns: (i64, i64),
    r: &mut ContentionResults,
) -> Res<()> {
    let cg = Cgroup::create("drain", bed.args.quota_millicores)?;
    let hogs = bed
        .args
        .hogs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    r.millicores = cg.millicores;
    r.hogs = hogs;
    for (i, (q, h)) in slots.iter().enumerate() {
        let tag = format!("contention round {}/{}", i + 1, slots.len());
        log(format!("{tag}: both drains under a {}m CPU quota", cg.millicores));
        r.quota
            .push(drain_pair(bed, q, lsns, bed.args.events, Some(&cg)).await?);
        log(format!("{tag}: both drains beside {hogs} busy-loop process(es)"));
        let hog = Hogs::start(hogs, drain_timeout(bed.args.events) * 4)?;
        let pair = drain_pair(bed, h, lsns, bed.args.events, None).await;
        drop(hog);
        r.hog.push(pair?);
    }
    Ok(())
}

/// One event per autocommit transaction, as fast as the database commits them
/// (pipelined on one connection), then drains of that backlog per round.
pub async fn small_transactions(bed: &Bed<'_>, r: &mut ContentionResults) -> Res<()> {
    let n = bed.args.small_events;
    r.small_events = n;
    let mut quiet = Vec::new();
    let mut quota = Vec::new();
    for i in 0..bed.args.rounds {
        quiet.push(prepare(bed, &format!("small.{i}")).await?);
        if bed.args.contention {
            quota.push(prepare(bed, &format!("small.quota.{i}")).await?);
        }
    }
    checkpoint(bed.sql).await?;
    log(format!("inserting {n} events, one per transaction"));
    let writer = bed.pg.client(DB).await?;
    let stmt = writer
        .prepare(&insert_sql(
            bed.args.payload,
            "public.outbox",
            "(SELECT $1::int8 AS i) AS s",
        ))
        .await?;
    let lsn0 = current_lsn(bed.sql).await?;
    let t = Instant::now();
    let mut k = 0;
    while k < n {
        let end = (k + 200).min(n);
        for res in join_all((k..end).map(|seq| {
            let (writer, stmt) = (&writer, &stmt);
            async move { writer.execute(stmt, &[&seq]).await }
        }))
        .await
        {
            res?;
        }
        k = end;
    }
    r.small_commit_rate = n as f64 / t.elapsed().as_secs_f64();
    let lsn1 = current_lsn(bed.sql).await?;
    checkpoint(bed.sql).await?;
    let cg = if bed.args.contention {
        Some(Cgroup::create("small", bed.args.quota_millicores)?)
    } else {
        None
    };
    for i in 0..bed.args.rounds {
        log(format!(
            "small transactions, round {}/{}: quiet",
            i + 1,
            bed.args.rounds
        ));
        r.small_quiet
            .push(drain_pair(bed, &quiet[i], (lsn0, lsn1), n, None).await?);
        if let Some(cg) = &cg {
            log(format!(
                "small transactions, round {}/{}: under the quota",
                i + 1,
                bed.args.rounds
            ));
            r.small_quota
                .push(drain_pair(bed, &quota[i], (lsn0, lsn1), n, Some(cg)).await?);
        }
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn min(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::INFINITY, f64::min)
}

fn max(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::NEG_INFINITY, f64::max)
}

/// CPU milliseconds per 1000 events.
fn per_k(d: &Drain) -> f64 {
    d.cpu.client * 1e6 / d.events.max(1) as f64
}

fn pair_rows(o: &mut String, name: &str, pairs: &[Pair]) {
    for (i, p) in pairs.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {name} | {} | {:.0}/s | {:.0}/s | {:.2}× | {:.1} / {:.1} ms | {:.2}× | {:.1} s |",
            i + 1,
            p.recv.rate(),
            p.relay.rate(),
            p.ratio(),
            per_k(&p.recv),
            per_k(&p.relay),
            p.cpu_ratio(),
            p.relay.cpu.other,
        );
    }
}

/// The section of the report: targets first, then every round.
pub fn section(r: &ContentionResults, quiet: &[Round], lat_2k: &Latency) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### CPU per event, contention, small transactions, latency at a higher rate\n"
    );
    let _ = writeln!(o, "| Measure | Value | Target | Result |");
    let _ = writeln!(o, "| --- | --- | --- | --- |");
    let quiet_cpu: Vec<f64> = quiet.iter().map(|x| x.relay.cpu.client / x.recv.cpu.client).collect();
    if !quiet_cpu.is_empty() {
        let worst = max(quiet_cpu.iter().copied());
        let _ = writeln!(
            o,
            "| Worker CPU per event / pg_recvlogical's, quiet rounds (each round; worst) | {} | ≤ 1.25× | {} |",
            quiet_cpu
                .iter()
                .map(|v| format!("{v:.2}×"))
                .collect::<Vec<_>>()
                .join(", "),
            verdict(worst <= 1.25)
        );
    }
    let mut ratio_line = |name: String, pairs: &[Pair]| {
        if pairs.is_empty() {
            return;
        }
        let worst = min(pairs.iter().map(Pair::ratio));
        let _ = writeln!(
            o,
            "| {name}: relay / pg_recvlogical drain (each round) | {} | ≥ 0.8× in every round | {} |",
            pairs
                .iter()
                .map(|p| format!("{:.2}×", p.ratio()))
                .collect::<Vec<_>>()
                .join(", "),
            verdict(worst >= 0.8)
        );
    };
    ratio_line(format!("Both under a {}m CPU quota", r.millicores), &r.quota);
    ratio_line(format!("Beside {} busy-loop process(es)", r.hogs), &r.hog);
    ratio_line(
        format!("{} one-event transactions, quiet", r.small_events),
        &r.small_quiet,
    );
    ratio_line(
        format!(
            "{} one-event transactions, both under a {}m CPU quota",
            r.small_events, r.millicores
        ),
        &r.small_quota,
    );
    let worse = |l: &Latency| l.hist_p99_ms.unwrap_or(f64::INFINITY).max(l.e2e_p99_ms);
    let rate = |l: &Latency| l.offered as f64 / l.offered_secs;
    if let Some(h) = &r.high_rate {
        let _ = writeln!(
            o,
            "| p99 latency (worse of commit→ack and insert→append): at {:.0} events/s / at {:.0} events/s | {:.1} ms / {:.1} ms | ≤ 20 ms at 10k/s | {} |",
            rate(lat_2k),
            rate(h),
            worse(lat_2k),
            worse(h),
            if rate(h) < 0.95 * 10_000.0 {
                "n/a (offered < 10k/s)"
            } else {
                verdict(worse(h) <= 20.0)
            }
        );
        let _ = writeln!(
            o,
            "| Insert→broker append p50 / p99 / max at {:.0} events/s (worker CPU {:.1} s for {} events) | {:.1} / {:.1} / {:.1} ms | | |",
            rate(h),
            h.cpu.client,
            h.offered,
            h.e2e_p50_ms,
            h.e2e_p99_ms,
            h.e2e_max_ms
        );
    }
    if r.small_events > 0 {
        let _ = writeln!(
            o,
            "\nSmall transactions: {} events inserted one per autocommit transaction at {:.0} commits/s \
             (pipelined on one connection).",
            r.small_events, r.small_commit_rate
        );
    }
    let _ = writeln!(
        o,
        "\n| Scenario | Round | pg_recvlogical | Relay | Relay / recvlogical | CPU per 1000 events: recvlogical / worker | CPU ratio | Other processes' CPU during the relay drain |"
    );
    let _ = writeln!(o, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let quiet_pairs: Vec<Pair> = quiet
        .iter()
        .map(|x| Pair {
            recv: x.recv.clone(),
            relay: x.relay.clone(),
        })
        .collect();
    pair_rows(&mut o, "quiet", &quiet_pairs);
    pair_rows(&mut o, &format!("quota {}m", r.millicores), &r.quota);
    pair_rows(&mut o, &format!("{} hog(s)", r.hogs), &r.hog);
    pair_rows(&mut o, "small tx, quiet", &r.small_quiet);
    pair_rows(&mut o, &format!("small tx, quota {}m", r.millicores), &r.small_quota);
    o
}
