//! The `outbox-operator operator` process: serves /healthz, /readyz (once the
//! initial list of relays is read) and /metrics, and exits cleanly on SIGTERM.

mod operator_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outbox_testbed::shared;

/// A plain HTTP/1.0 GET; returns (status code, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_probes_and_metrics_and_stops_on_sigterm() {
    let bed = shared().await;
    let client = bed.kube.client().await.expect("kube client");
    operator_support::install_crd(&client).await;
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
        if let Some((200, body)) = get(port, "/readyz") {
            assert_eq!(body, "watching");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        assert!(child.try_wait().expect("wait").is_none(), "the operator exited early");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(port, "/healthz").map(|(c, _)| c), Some(200));
    let (code, metrics) = get(port, "/metrics").expect("metrics");
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
