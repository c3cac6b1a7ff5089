//! The operator's memory with many Secrets in the cluster that no relay uses.
//!
//! Starts a private kube-apiserver, creates `--secrets N` Secrets (default 10 000,
//! 2 KiB of data each) in a namespace of their own plus one relay elsewhere, then
//! runs the operator binary until it is ready and has listed everything, and reads
//! its peak and current RSS from /proc. With `OUTBOX_BENCH_BASELINE_OPERATOR=PATH`
//! (e.g. a build of an earlier commit) it measures that binary the same way in the
//! same run and prints the ratio.
//!
//!   cargo bench --bench operator_secrets [-- --secrets N]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::CustomResourceExt;
use kube::api::{Api, PostParams};
use outbox_operator::api::OutboxRelay;
use outbox_testbed::{Components, KubeApi, free_port, http_get};
use serde_json::json;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (peak, current) resident set in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

async fn measure(binary: &Path, kube: &KubeApi, settle: Duration) -> (u64, u64) {
    let port = free_port().expect("port");
    let mut child = Command::new(binary)
        .args([
            "--log-format",
            "text",
            "operator",
            "--relay-image",
            "example.test/relay:1",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", kube.kubeconfig_path())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the operator");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !matches!(http_get(&format!("127.0.0.1:{port}"), "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "the operator never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ready means the relays were listed; the Secret watch lists alongside.
    tokio::time::sleep(settle).await;
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    rss
}

#[tokio::main]
async fn main() {
    let n = arg("--secrets", 10_000);
    let components = Components::locate().expect("test bed components (hack/testbed fetch)");
    let kube = KubeApi::start(&components).await.expect("kube-apiserver");
    let client = kube.client().await.expect("client");
    kube.install_crd(&OutboxRelay::crd()).await.expect("CRD");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["unrelated", "shop"] {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
        namespaces
            .create(&PostParams::default(), &obj)
            .await
            .expect("namespace");
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "unrelated");
    let blob = "s".repeat(2048);
    let started = Instant::now();
    let mut tasks = futures::stream::iter(0..n)
        .map(|i| {
            let secrets = secrets.clone();
            let blob = blob.clone();
            async move {
                let s: Secret = serde_json::from_value(json!({
                    "metadata": {"name": format!("team-secret-{i}")},
                    "stringData": {"token": blob}
                }))
                .expect("secret");
                secrets.create(&PostParams::default(), &s).await.expect("create secret");
            }
        })
        .buffer_unordered(32);
    while tasks.next().await.is_some() {}
    eprintln!("created {n} Secrets in {:.1} s", started.elapsed().as_secs_f64());

    let current = PathBuf::from(env!("CARGO_BIN_EXE_outbox-operator"));
    let settle = Duration::from_secs(10);
    let (peak, now) = measure(&current, &kube, settle).await;
    println!("| operator | Secrets | peak RSS | RSS after sync |");
    println!("|---|---:|---:|---:|");
    println!(
        "| this build | {n} | {:.1} MiB | {:.1} MiB |",
        peak as f64 / 1024.0,
        now as f64 / 1024.0
    );
    if let Ok(base) = std::env::var("OUTBOX_BENCH_BASELINE_OPERATOR") {
        let (bpeak, bnow) = measure(Path::new(&base), &kube, settle).await;
        println!(
            "| baseline | {n} | {:.1} MiB | {:.1} MiB |",
            bpeak as f64 / 1024.0,
            bnow as f64 / 1024.0
        );
        println!(
            "\nthis build / baseline: peak {:.2}x, after sync {:.2}x",
            peak as f64 / bpeak.max(1) as f64,
            now as f64 / bnow.max(1) as f64
        );
    }
}
