//! `/metrics`, `/healthz` and `/readyz` for the worker.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::relay::worker::RelayHandle;

/// Binds first, so a taken port fails the start instead of a later scrape.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the endpoints until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: RelayHandle,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(handle);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

async fn metrics(State(h): State<RelayHandle>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

async fn readyz(State(h): State<RelayHandle>) -> impl IntoResponse {
    match h.state.readiness() {
        Ok(phase) => (StatusCode::OK, phase.to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
