//! The worker's supervisor: runs sessions, backs off after failures, waits as a
//! hot standby while another worker holds the slot, and stops cleanly on signal.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, error, info, info_span, warn};

use super::config::RelayConfig;
use super::session::{self, SessionEnd};
use super::state::{Phase, RelayState};
use crate::kafka::BrokerHealth;
use crate::metrics::RelayMetrics;

/// A running relay's shared parts, for the HTTP endpoints and for tests.
#[derive(Clone)]
pub struct RelayHandle {
    pub metrics: RelayMetrics,
    pub state: Arc<RelayState>,
    pub kafka: Arc<BrokerHealth>,
}

impl RelayHandle {
    pub fn new() -> Self {
        Self {
            metrics: RelayMetrics::new(),
            state: Arc::new(RelayState::default()),
            kafka: Arc::new(BrokerHealth::default()),
        }
    }
}

impl Default for RelayHandle {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs the relay until `shutdown` turns true. Never returns an error: every
/// failure is logged, counted, reported through readiness and retried, because
/// giving up would leave the slot retaining WAL with nobody reading it.
pub async fn run(cfg: RelayConfig, handle: RelayHandle, shutdown: watch::Receiver<bool>) {
    run_with(cfg, handle, shutdown, None).await
}

/// [`run`] with the Kubernetes client for status reporting given (tests); `None`
/// makes one from the environment (in-cluster or KUBECONFIG) when
/// `cfg.report_status` is on.
pub async fn run_with(
    cfg: RelayConfig,
    handle: RelayHandle,
    shutdown: watch::Receiver<bool>,
    client: Option<kube::Client>,
) {
    let span = info_span!("relay", namespace = %cfg.namespace, name = %cfg.name, slot = %cfg.slot);
    async move {
        let mut cfg = cfg;
        handle.state.set_liveness_bound(cfg.tuning.liveness_bound);
        let skips = spawn_reporter(&cfg, &handle, shutdown.clone(), client).await;
        let fixed_skip = cfg.skip.clone();
        let mut read_skip = true;
        let deletions = spawn_deleter(&cfg, &handle, shutdown.clone());
        let mut backoff = cfg.tuning.min_backoff;
        // The server process of our own last connection, when it went silent:
        // it holds the slot until the server notices (wal_sender_timeout, 60 s
        // by default), so a "slot in use" naming it is ended rather than waited out.
        let mut stale_backend: Option<i32> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            if let Some(src) = &skips
                && read_skip
            {
                // The annotation, if set, is the skip request for this session.
                // Read at start and after each failed session, not on every poll
                // of a hot standby.
                read_skip = false;
                cfg.skip = match src.skip_request().await.map(|s| s.parse()) {
                    Some(Ok(e)) => Some(e),
                    Some(Err(why)) => {
                        warn!(%why, "ignoring the outbox.dev/skip-event annotation");
                        fixed_skip.clone()
                    }
                    None => fixed_skip.clone(),
                };
            }
            let started = Instant::now();
            let result = if cfg.poll.is_some() {
                session::run_polling(&cfg, &handle.metrics, &handle.state, &handle.kafka, shutdown.clone()).await
            } else {
                session::run(
                    &cfg,
                    &handle.metrics,
                    &handle.state,
                    &handle.kafka,
                    deletions.as_ref(),
                    shutdown.clone(),
                )
                .await
            };
            let wait = match result {
                Ok(SessionEnd::Shutdown) => return,
                Err(e) if e.is_slot_in_use() && stale_backend.is_some() => {
                    let pid = stale_backend.take().unwrap_or_default();
                    let ended = if cfg.poll.is_some() {
                        session::end_stale_poller(&cfg, pid).await
                    } else {
                        super::retention::end_stale_walsender(&cfg, pid).await
                    };
                    match ended {
                        Ok(true) => info!(pid, "ended the server process of our silent connection; it held the slot (or the poller's lock)"),
                        Ok(false) => {}
                        Err(e) => warn!(pid, error = %e, "could not end the server process of our silent connection; waiting for the server to drop it"),
                    }
                    cfg.tuning.min_backoff
                }
                Err(e) if e.is_slot_in_use() => {
                    if handle.state.phase() != Phase::Standby {
                        info!(reason = %e, "the slot (or the poller's lock) is held by another worker; waiting as hot standby");
                    }
                    handle.state.set_phase(Phase::Standby);
                    backoff = cfg.tuning.min_backoff;
                    cfg.tuning.standby_poll
                }
                Err(e) => {
                    read_skip = true;
                    if let Some(pid) = e.stale_backend() {
                        stale_backend = Some(pid);
                    }
                    let category = e.category();
                    handle.metrics.error(category);
                    handle.state.set_error(category, e.to_string());
                    // A session that ran for a while made progress: start the backoff over.
                    if started.elapsed() > cfg.tuning.max_backoff {
                        backoff = cfg.tuning.min_backoff;
                    }
                    warn!(error = %e, category, retry_in_ms = backoff.as_millis() as u64, "session ended");
                    let w = backoff;
                    backoff = (backoff * 2).min(cfg.tuning.max_backoff);
                    w
                }
            };
            let mut sd = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = sd.changed() => return,
            }
        }
    }
    .instrument(span)
    .await
}

/// With status reporting on, a task that keeps the `Delivering` condition
/// current (checked every 2 s, written only on change); returns where to read
/// skip requests. Without an API server the worker runs on, unreported.
async fn spawn_reporter(
    cfg: &RelayConfig,
    handle: &RelayHandle,
    mut shutdown: watch::Receiver<bool>,
    client: Option<kube::Client>,
) -> Option<super::status_report::SkipSource> {
    if !cfg.report_status {
        return None;
    }
    let client = match client {
        Some(c) => Ok(c),
        None => kube::Client::try_default().await,
    };
    let mut reporter = match client.map(|c| super::status_report::StatusReporter::new(c, &cfg.namespace, &cfg.name)) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "status reporting is on but there is no Kubernetes client; running without it");
            return None;
        }
    };
    let skips = reporter.skip_source();
    let state = handle.state.clone();
    tokio::spawn(
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => reporter.report(&state).await,
                    _ = shutdown.changed() => return,
                }
            }
        }
        .in_current_span(),
    );
    Some(skips)
}

/// With `deleteAfterRelay`, a task that deletes delivered rows in batches over
/// its own SQL connection, so deletes never slow the replication stream.
fn spawn_deleter(
    cfg: &RelayConfig,
    handle: &RelayHandle,
    shutdown: watch::Receiver<bool>,
) -> Option<mpsc::UnboundedSender<Vec<Bytes>>> {
    // A poller deletes in its own batch transaction.
    if !cfg.delete_after_relay || cfg.poll.is_some() {
        return None;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let cfg = cfg.clone();
    let metrics = handle.metrics.clone();
    tokio::spawn(super::retention::run(cfg, metrics, rx, shutdown).in_current_span());
    Some(tx)
}

/// Waits for SIGTERM or Ctrl-C and flips the shutdown flag.
pub async fn shutdown_on_signal(tx: watch::Sender<bool>) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down");
    let _ = tx.send(true);
}
