//! `/metrics`, `/healthz` and `/readyz`, served by the worker and by the operator.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::relay::worker::RelayHandle;

/// What the endpoints report. The worker and the operator each implement it, so
/// both roles expose the same three paths with the same semantics.
pub trait Probe: Clone + Send + Sync + 'static {
    /// The OpenMetrics text exposition.
    fn metrics(&self) -> String;
    /// `Ok(what)` when ready to serve; `Err(why)` otherwise.
    fn readiness(&self) -> Result<String, String>;
    /// `Err(why)` when the process is stuck and only a restart helps (`/healthz`).
    fn liveness(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Probe for RelayHandle {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn readiness(&self) -> Result<String, String> {
        self.state.readiness().map(str::to_string)
    }

    fn liveness(&self) -> Result<(), String> {
        self.state.liveness()
    }
}

/// Binds first, so a taken port fails the start instead of a later scrape.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the endpoints until `shutdown` turns true.
pub async fn serve<P: Probe>(
    listener: tokio::net::TcpListener,
    probe: P,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics::<P>))
        .route("/healthz", get(healthz::<P>))
        .route("/readyz", get(readyz::<P>))
        .with_state(probe);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

async fn metrics<P: Probe>(State(p): State<P>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        p.metrics(),
    )
}

async fn healthz<P: Probe>(State(p): State<P>) -> impl IntoResponse {
    match p.liveness() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn readyz<P: Probe>(State(p): State<P>) -> impl IntoResponse {
    match p.readiness() {
        Ok(what) => (StatusCode::OK, what),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
