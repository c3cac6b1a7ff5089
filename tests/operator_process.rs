//! The `outbox-operator operator` process: serves /healthz, /readyz (once the
//! initial list of relays is read) and /metrics, and exits cleanly on SIGTERM.

mod operator_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::CustomResourceExt;
use outbox_operator::api::OutboxRelay;
use outbox_testbed::shared;

/// The operator's HTTP endpoint on loopback.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    outbox_testbed::http_get(&format!("127.0.0.1:{port}"), path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_probes_and_metrics_and_stops_on_sigterm() {
    let bed = shared().await;
    bed.kube.install_crd(&OutboxRelay::crd()).await.expect("install CRD");
    let port = operator_support::closed_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-operator"))
        .args([
            "--log-format",
            "text",
            "operator",
            "--relay-image",
            "example.test/relay:1",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", bed.kube.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the operator");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = get(port, "/readyz").await {
            assert_eq!(body, "watching");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        assert!(child.try_wait().expect("wait").is_none(), "the operator exited early");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(port, "/healthz").await.map(|(c, _)| c), Some(200));
    let (code, metrics) = get(port, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("outbox_operator_reconcile_duration_seconds"),
        "{metrics}"
    );

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the operator did not stop within 20 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status}");
}
