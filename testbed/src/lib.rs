//! Test bed: real servers on loopback.
//!
//! Integration tests, benchmarks and the demo talk to real PostgreSQL, Kafka (KRaft)
//! and kube-apiserver (+ etcd) processes that this crate starts on free loopback
//! ports, each in its own temporary directory. The binaries come from
//! `hack/testbed fetch`; [`Components::locate`] finds them and fails loudly when one
//! is missing, so a test never silently skips.
//!
//! Most tests share one bed per test binary through [`shared`]; tests that stop or
//! crash a server start a private one ([`Postgres::start`], [`Kafka::start`]) so they
//! do not disturb their neighbours.
//!
//! Every server runs under a small watchdog (see `process.rs`) that stops it as soon
//! as the test process goes away, even when that process is SIGKILLed, so a bed kept
//! in a `static` never outlives its test binary.
#![forbid(unsafe_code)]

pub mod cluster;
mod components;
mod error;
mod kafka;
mod kube_api;
mod postgres;
mod process;

use std::time::Instant;

pub use components::{ClusterComponents, Components};
pub use error::{Result, TestbedError};
pub use kafka::Kafka;
pub use kube_api::KubeApi;
pub use postgres::Postgres;

/// The outbox table of tests, benchmarks and the demo: Debezium's column names,
/// a uuid id and a jsonb payload, plus an insert time for latency measurements.
pub const OUTBOX_DDL: &str = "CREATE TABLE public.outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text,
    type text NOT NULL,
    payload jsonb,
    headers jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
)";

/// A free loopback port (bound, then released), e.g. for a worker's HTTP endpoints.
pub fn free_port() -> Result<u16> {
    process::free_port()
}

/// A plain HTTP/1.0 GET on loopback, enough for probes and `/metrics`: the status
/// code and the body, or `None` while nothing answers.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    // Bounded: a connect to an address nobody answers on (a pod that went away)
    // would otherwise wait for the kernel's SYN retries, about two minutes.
    tokio::time::timeout(std::time::Duration::from_secs(5), http_get_unbounded(addr, path))
        .await
        .ok()
        .flatten()
}

async fn http_get_unbounded(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The three servers most tests need.
pub struct TestBed {
    pub pg: Postgres,
    pub kafka: Kafka,
    pub kube: KubeApi,
}

impl TestBed {
    /// Starts a private bed (all three servers in parallel). Prefer [`shared`] unless
    /// the test stops or breaks servers.
    pub async fn start() -> Result<Self> {
        let components = Components::locate()?;
        Self::start_with(&components).await
    }

    pub async fn start_with(c: &Components) -> Result<Self> {
        let started = Instant::now();
        let (pg, kafka, kube) = tokio::try_join!(
            timed("postgres", Postgres::start(c)),
            timed("kafka", Kafka::start(c)),
            timed("kube-apiserver", KubeApi::start(c)),
        )?;
        tracing::info!(elapsed = ?started.elapsed(), "test bed ready");
        Ok(Self { pg, kafka, kube })
    }
}

pub(crate) async fn timed<T>(name: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let out = fut.await;
    tracing::info!(server = name, elapsed = ?started.elapsed(), ok = out.is_ok(), "started");
    out
}

// The outcome is cached, failure included: once the bed could not start, every later
// test in the binary fails at once with the same message instead of retrying the
// whole slow start.
static SHARED: tokio::sync::OnceCell<std::result::Result<TestBed, TestbedError>> = tokio::sync::OnceCell::const_new();

/// The bed shared by all tests of this test binary, started on first use.
///
/// Panics (failing the test) when the bed cannot start; see [`try_shared`].
///
/// The servers do not belong to any tokio runtime (each `#[tokio::test]` has its own
/// and it dies with the test), so clients must be made per test: [`Postgres::client`]
/// and [`KubeApi::client`] build a fresh one on every call.
pub async fn shared() -> &'static TestBed {
    match try_shared().await {
        Ok(bed) => bed,
        Err(e) => panic!("test bed failed to start: {e}"),
    }
}

/// Like [`shared`] but returns the start error.
pub async fn try_shared() -> std::result::Result<&'static TestBed, &'static TestbedError> {
    SHARED.get_or_init(TestBed::start).await.as_ref()
}

/// A lowercase, DNS-label-safe name with a random suffix, for a per-test namespace,
/// database or topic: `unique_name("Relay Test")` gives e.g. `relay-test-k3x9q2mz`.
pub fn unique_name(prefix: &str) -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;

    let mut base: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    // Labels must start with a letter for some consumers (PostgreSQL identifiers,
    // RFC 1035 names), and may not start or end with '-'.
    base = base.trim_matches('-').to_string();
    if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
        base.insert(0, 't');
    }
    base.truncate(63 - 9);
    let base = base.trim_end_matches('-');
    let suffix: String = rand::rng()
        .sample_iter(Alphanumeric)
        .map(|b| (b as char).to_ascii_lowercase())
        .take(8)
        .collect();
    format!("{base}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::unique_name;

    #[test]
    fn unique_names_are_dns_labels() {
        for prefix in ["relay", "Relay Test", "9lives", "--x--", "", &"a".repeat(100)] {
            let n = unique_name(prefix);
            assert!(n.len() <= 63, "{n}");
            assert!(n.starts_with(|c: char| c.is_ascii_lowercase()), "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
            assert!(!n.ends_with('-') && !n.contains("--x"), "{n}");
        }
        assert_ne!(unique_name("a"), unique_name("a"));
    }
}
