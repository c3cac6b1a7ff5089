//! End to end on a real single-node cluster: the chart installed with Helm, the
//! operator running as a pod under the chart's ServiceAccount and RBAC, and the
//! worker Deployment it renders run by the kubelet, with its real probes.
//!
//! `harness = false`: [`outbox_testbed::cluster::main`] runs these tests inside
//! the cluster's private namespaces.

mod cluster_support;
mod support;

use std::process::ExitCode;
use std::time::Duration;

use cluster_support::{Case, id_set};
use support::{assert_all_delivered, check_per_key_order, consume_async};

fn main() -> ExitCode {
    outbox_testbed::cluster::main(outbox_testbed::cluster_tests![
        applied_relay_runs_ready_pods_and_events_flow
    ])
}

/// Apply an OutboxRelay: the worker pod turns Running and Ready (its readiness
/// probe only passes once it streams), and every committed event arrives in order
/// per key.
async fn applied_relay_runs_ready_pods_and_events_flow() {
    let case = Case::new("flow", 3).await;
    case.create_relay("orders", case.spec(serde_json::json!({}))).await;
    let pods = case.await_ready_pods("orders", 1).await;
    assert_eq!(pods.len(), 1);
    let ids = case.insert_events(10, 20, 25, 1).await;
    let records = consume_async(
        &case.cluster.kafka.bootstrap(),
        &case.topic,
        &id_set(&ids),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_all_delivered(&records, &id_set(&ids));
    if let Err(e) = check_per_key_order(&records) {
        panic!("{e}\n{}", case.dump("orders").await);
    }
}
