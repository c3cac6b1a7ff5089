//! The drains: the release worker binary as a child process, as it runs in a pod,
//! working through the backlog until its slot confirms the last commit, and
//! `pg_recvlogical` decoding the same WAL from a second slot to a file (the rate at
//! which PostgreSQL can decode the rows at all). Both are timed from their process
//! start and sampled the same way, which is why they share this module, along with
//! `Drain`, the figures every approach reports, and the steady rate without the
//! start-up.
//!
//! The latency phase reuses the worker and `wait_confirmed` from here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_operator::api::OutboxRelaySpec;
use outbox_operator::relay::config::Credentials;
use outbox_operator::relay::lsn::Lsn;
use outbox_testbed::{Postgres, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::contention::Cgroup;
use crate::cpu::{Cpu, CpuSample, proc_cpu_secs};
use crate::{DB, Res, log};

const SLOT_POLL: Duration = Duration::from_millis(50);

/// One drain: how long, and who burnt the CPU meanwhile.
#[derive(Default, Debug, Clone)]
pub struct Drain {
    pub secs: f64,
    pub events: i64,
    pub cpu: Cpu,
    /// Start-up excluded: (seconds to the first progress, events/s from 10 % to
    /// 90 % of the backlog), where progress could be watched.
    pub steady: Option<(f64, f64)>,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

/// From a progress timeline over a backlog from `start` to `end` (LSNs, or bytes
/// of output), all rows alike: when progress began, and the rate between 10 % and
/// 90 % of the way, which leaves out process start, connection and the tail.
pub fn steady_rate(progress: &[(f64, i64)], start: i64, end: i64, events: i64) -> Option<(f64, f64)> {
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

pub fn drain_timeout(events: i64) -> Duration {
    // Far above any plausible run; only there so a wedged run ends by itself.
    Duration::from_secs(120 + (events as u64) / 500)
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
pub async fn wait_confirmed(
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
pub struct Worker {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    /// Highest `outbox_relay_in_flight_events` seen while waiting for it.
    pub max_in_flight: i64,
    /// When the first acknowledgement was seen in its metrics (seconds since the
    /// wait's start).
    pub first_ack: Option<f64>,
}

impl Worker {
    pub fn spawn(spec: &OutboxRelaySpec, creds: &Credentials, dir: &Path) -> Res<Self> {
        let spec_path = dir.join("relay.json");
        let doc = serde_json::json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": spec,
        });
        std::fs::write(&spec_path, serde_json::to_vec(&doc)?)?;
        // Free a moment ago; the worker binds it a moment later.
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.pid(), false).unwrap_or(0.0)
    }

    /// VmHWM: the most resident memory the process ever had.
    pub fn peak_rss_kib(&self) -> Res<u64> {
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

    pub async fn metrics(&self) -> Res<String> {
        let mut s = tokio::net::TcpStream::connect(self.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(text))
    }

    /// SIGTERM (the graceful stop a pod gets), SIGKILL if that takes too long.
    pub async fn stop(&mut self) {
        stop_gracefully(&mut self.child).await;
    }
}

/// SIGTERM, then SIGKILL after 20 s: for the worker and for Kafka Connect alike.
pub async fn stop_gracefully(child: &mut std::process::Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill_if_running(child);
}

/// SIGKILL, if it still runs: what a failed run's drop does, so no process is left
/// streaming from a slot behind it.
pub fn kill_if_running(child: &mut std::process::Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// The worker binary built with this bench, unless OUTBOX_BENCH_WORKER names
/// another one (to compare two builds on the same bed).
fn worker_binary() -> PathBuf {
    std::env::var_os("OUTBOX_BENCH_WORKER")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_outbox-operator")), PathBuf::from)
}

/// `pg_recvlogical` from the second slot to a file, stopping at `endpos`.
// Each argument is one fact about the run; a struct for a single caller would
// only move them around.
#[allow(clippy::too_many_arguments)]
pub async fn recvlogical(
    pg: &Postgres,
    sql: &tokio_postgres::Client,
    slot: &str,
    publication: &str,
    endpos: i64,
    out: &Path,
    events: i64,
    kafka_pid: u32,
    cgroup: Option<&Cgroup>,
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
    if let Some(cg) = cgroup {
        cg.add(child.id())?;
    }
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

/// The value of an unlabelled gauge in the exposition text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
