//! Two operator replicas from the chart, one Lease: exactly one reconciles, the
//! standby serves its probes without reconciling, and when the leader goes away —
//! deleted (clean shutdown, the Lease is released) or killed (no shutdown at all) —
//! the other takes over within the lease duration and reconciles what changed
//! meanwhile.
//!
//! `harness = false`: [`outbox_testbed::cluster::main`] runs these tests inside
//! the cluster's private namespaces.

mod cluster_support;
mod support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster_support::{Case, OPERATOR_NS, RELEASE, id_set, pod_ready};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use support::{assert_all_delivered, consume_async};

fn main() -> ExitCode {
    outbox_testbed::cluster::main(outbox_testbed::cluster_tests![
        one_replica_leads_and_the_other_takes_over_when_it_goes
    ])
}

/// The chart's lease duration.
const LEASE: Duration = Duration::from_secs(15);

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(RELEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// The pod whose name the identity starts with (`<pod>_<suffix>`).
fn pod_of(identity: &str) -> &str {
    identity.rsplit_once('_').map_or(identity, |(pod, _)| pod)
}

async fn operator_pods(pods: &Api<Pod>) -> Vec<Pod> {
    let lp = ListParams::default().labels("app.kubernetes.io/name=outbox-operator");
    pods.list(&lp)
        .await
        .expect("list operator pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// `GET path` on the pod's port 8080 (the test runs in the cluster's network).
async fn get(pod: &Pod, path: &str) -> (u16, String) {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod ip");
    outbox_testbed::http_get(&format!("{ip}:8080"), path)
        .await
        .unwrap_or_else(|| panic!("no answer from {}{path}", pod.name_any()))
}

fn reconciles(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("outbox_operator_reconcile_duration_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the Lease names a holder other than `old`; returns it and how long
/// that took.
async fn await_new_holder(leases: &Api<Lease>, old: &str, since: Instant, limit: Duration) -> (String, Duration) {
    loop {
        if let Some(h) = holder(leases).await
            && h != old
        {
            return (h, since.elapsed());
        }
        assert!(since.elapsed() < limit, "no new leader {limit:?} after {old} went away");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn one_replica_leads_and_the_other_takes_over_when_it_goes() {
    let case = Case::new("failover", 1).await;
    let client = case.client.clone();
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);

    // The leader reconciles a relay; the standby answers its probes but never reconciles.
    case.create_relay("before", case.spec(serde_json::json!({}))).await;
    case.await_ready_pods("before", 1).await;
    let leader = holder(&leases).await.expect("a leader holds the Lease");
    let all = operator_pods(&pods).await;
    assert_eq!(all.len(), 2, "two operator replicas");
    assert!(all.iter().all(pod_ready), "both replicas Ready");
    let (lead_pod, standby): (Vec<Pod>, Vec<Pod>) = all.into_iter().partition(|p| p.name_any() == pod_of(&leader));
    let (lead_pod, standby) = (&lead_pod[0], &standby[0]);
    let (code, body) = get(standby, "/readyz").await;
    assert_eq!(code, 200, "standby readiness: {body}");
    assert!(body.contains("standby"), "standby readiness says so: {body}");
    let (code, _) = get(standby, "/healthz").await;
    assert_eq!(code, 200);
    assert!(
        reconciles(&get(lead_pod, "/metrics").await.1) > 0.0,
        "the leader reconciled"
    );
    assert_eq!(
        reconciles(&get(standby, "/metrics").await.1),
        0.0,
        "the standby never reconciled"
    );

    // Clean hand-over: the deleted leader releases the Lease on SIGTERM.
    let t = Instant::now();
    pods.delete(&lead_pod.name_any(), &DeleteParams::default())
        .await
        .expect("delete the leader pod");
    let (second, graceful) = await_new_holder(&leases, &leader, t, LEASE * 2).await;
    eprintln!(
        "hand-over after deleting the leader pod: {:.1}s",
        graceful.as_secs_f32()
    );
    assert!(
        graceful < LEASE,
        "a released Lease is taken over at once, took {graceful:?}"
    );

    // Crash: SIGKILL the new leader's process; nobody releases anything, so the
    // other replica takes over once the Lease expired.
    cluster_support::await_deployment_available(&client, OPERATOR_NS, RELEASE, 2).await;
    let crashed = pods.get(pod_of(&second)).await.expect("leader pod");
    let container = crashed
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.container_id.clone())
        .expect("leader container id");
    let t = Instant::now();
    case.cluster.kill_container(&container).await.expect("kill the leader");
    // Meanwhile a relay appears: whoever leads next must reconcile it.
    case.create_relay("after", case.spec(serde_json::json!({}))).await;
    let (third, crash) = await_new_holder(&leases, &second, t, LEASE * 3).await;
    eprintln!(
        "hand-over after killing the leader: {:.1}s (lease duration {LEASE:?})",
        crash.as_secs_f32()
    );
    // The follower counts the lease duration from when it first saw the last
    // renewal (up to one retry period after it) and looks again every retry
    // period (2 s): the hand-over comes within the duration plus two of those,
    // and a little slack for a busy API server.
    assert!(crash <= LEASE + Duration::from_secs(6), "took {crash:?}");
    assert_ne!(pod_of(&third), "", "{third}");

    case.await_ready_pods("after", 1).await;
    let ids = case.insert_events(4, 10, 10, 1).await;
    let records = consume_async(
        &case.cluster.kafka.bootstrap(),
        &case.topic,
        &id_set(&ids),
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    // Both relays read the same table into the same topic: every id arrives.
    assert_all_delivered(&records, &id_set(&ids));
}
