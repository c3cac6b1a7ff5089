//! End to end on a real single-node cluster: the chart installed with Helm, the
//! operator running as pods under the chart's ServiceAccount and RBAC, and the
//! worker Deployment it renders run by the kubelet with its real probes. Each test
//! writes events while it disturbs the workers and then checks that every
//! committed event arrived, in order per key.
//!
//! `harness = false`: [`outbox_testbed::cluster::main`] runs these tests inside
//! the cluster's private namespaces.

mod cluster_support;
mod support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster_support::{Case, OPERATOR_NS, names, pod_get};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, DeleteParams, ListParams};
use outbox_operator::api::names::{default_publication_name, default_slot_name};
use serde_json::json;

fn main() -> ExitCode {
    outbox_testbed::cluster::main(outbox_testbed::cluster_tests![
        applied_relay_runs_ready_pods_and_events_flow,
        deleted_worker_pod_is_replaced_without_loss,
        standby_takes_over_when_the_active_pod_is_killed,
        spec_change_rolls_the_pods_without_loss,
        suspend_keeps_the_slot_and_resume_drains_the_backlog,
        deleted_relay_is_garbage_collected_and_cleaned_up_per_policy,
        deleted_namespace_finishes_under_both_policies,
        rotated_secret_rolls_the_pods,
        polling_relay_runs_as_pods_and_its_standby_takes_over,
        // Last: it reads what every test above made the operator do.
        the_chart_grants_every_permission_the_operator_used,
    ])
}

/// Apply an OutboxRelay: the worker pod turns Running and Ready (its readiness
/// probe only passes once it streams), and every committed event arrives in order
/// per key.
async fn applied_relay_runs_ready_pods_and_events_flow() {
    let case = Case::new("flow", 3).await;
    let t = Instant::now();
    case.create_relay("orders", case.spec(json!({}))).await;
    let pods = case.await_ready_pods("orders", 1).await;
    eprintln!("relay applied -> worker pod Ready: {:.1}s", t.elapsed().as_secs_f32());
    // Ready means Streaming or Standby; a first session that failed under load can
    // find its own previous server process still holding the slot for a moment.
    let phases = await_phases(&pods, |p| p == ["Streaming"]).await;
    assert_eq!(phases, ["Streaming"]);
    let ids = case.insert_events(10, 20, 25, 1).await;
    case.assert_delivered("orders", &ids).await;
    // The operator's own first steps (its finalizer on the credentials Secret among
    // them) must not roll the workers it just started: one ReplicaSet, same pod.
    let sets: Api<ReplicaSet> = Api::namespaced(case.client.clone(), &case.ns);
    let sets = sets
        .list(&ListParams::default().labels("app.kubernetes.io/instance=orders"))
        .await
        .expect("list ReplicaSets");
    assert_eq!(sets.items.len(), 1, "the new relay's workers were rolled");
    assert_eq!(names(&case.ready_pods("orders").await), names(&pods));
}

/// Delete the worker pod while events are written: the Deployment replaces it,
/// the new pod resumes from the slot, nothing is lost.
async fn deleted_worker_pod_is_replaced_without_loss() {
    let case = Case::new("podloss", 3).await;
    case.create_relay("orders", case.spec(json!({}))).await;
    let old = names(&case.await_ready_pods("orders", 1).await);
    let writer = case.start_writer(5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    case.pods()
        .delete(&old[0], &DeleteParams::default())
        .await
        .expect("delete worker pod");
    case.await_replaced("orders", &old, 1).await;
    eprintln!(
        "deleted worker pod replaced and Ready: {:.1}s",
        t.elapsed().as_secs_f32()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids = writer.stop().await;
    case.assert_delivered("orders", &ids).await;
}

/// Two workers: one streams, one stands by (both Ready). SIGKILL the active one:
/// the standby takes the slot over and nothing is lost.
async fn standby_takes_over_when_the_active_pod_is_killed() {
    let case = Case::new("standby", 3).await;
    case.create_relay("orders", case.spec(json!({"worker": {"replicas": 2}})))
        .await;
    let pods = case.await_ready_pods("orders", 2).await;
    let phases = await_phases(&pods, |p| {
        p.iter().filter(|b| *b == "Streaming").count() == 1 && p.iter().filter(|b| *b == "Standby").count() == 1
    })
    .await;
    let active = phases.iter().position(|b| b == "Streaming");
    let standby = phases.iter().position(|b| b == "Standby");
    let (Some(active), Some(standby)) = (active, standby) else {
        panic!(
            "want one Streaming and one Standby worker, got {phases:?}\n{}",
            case.dump("orders").await
        );
    };
    let writer = case.start_writer(5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = kill_and_await_takeover(&case, &pods[active], &pods[standby]).await;
    eprintln!(
        "standby worker streaming {:.1}s after the active one was killed",
        took.as_secs_f32()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids = writer.stop().await;
    case.assert_delivered("orders", &ids).await;
}

/// SIGKILLs the `active` worker's container; returns how long until a worker
/// streams again: normally the `standby`, which takes the slot (or the poller's
/// lock) over at its next try. The kubelet restarts the killed container at once,
/// and on a loaded node that new process can reach the free slot first; it is a
/// takeover too (the relay streams again, nothing is lost), and it is reported.
async fn kill_and_await_takeover(
    case: &Case,
    active: &k8s_openapi::api::core::v1::Pod,
    standby: &k8s_openapi::api::core::v1::Pod,
) -> Duration {
    let container = active
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .expect("container id");
    let t = Instant::now();
    case.cluster
        .kill_container(&container)
        .await
        .expect("kill active worker");
    loop {
        let body = pod_get(standby, "/readyz").await.map(|(_, b)| b);
        if body.as_deref() == Some("Streaming") {
            return t.elapsed();
        }
        let restarted = pod_get(active, "/readyz").await.map(|(_, b)| b);
        if restarted.as_deref() == Some("Streaming") {
            eprintln!(
                "the killed worker's restarted container took the slot first ({:.1}s); the standby stays standby",
                t.elapsed().as_secs_f32()
            );
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no worker streams 60 s after the active one was killed: standby {body:?}, restarted {restarted:?}\n{}",
            case.dump("orders").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A spec change renders a new pod template: the Deployment rolls the pods while
/// events are written, nothing is lost.
async fn spec_change_rolls_the_pods_without_loss() {
    let case = Case::new("rollout", 3).await;
    case.create_relay("orders", case.spec(json!({}))).await;
    let old = names(&case.await_ready_pods("orders", 1).await);
    let writer = case.start_writer(5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    case.patch_spec("orders", json!({"kafka": {"producer": {"lingerMs": 7}}}))
        .await;
    case.await_replaced("orders", &old, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids = writer.stop().await;
    case.assert_delivered("orders", &ids).await;
}

/// `suspend: true` scales the workers to zero; the slot stays and keeps the WAL,
/// the lag shows in status; resuming drains the backlog.
async fn suspend_keeps_the_slot_and_resume_drains_the_backlog() {
    let case = Case::new("suspend", 1).await;
    case.create_relay("orders", case.spec(json!({}))).await;
    case.await_ready_pods("orders", 1).await;
    let before = case.insert_events(2, 5, 5, 1).await;
    case.patch_spec("orders", json!({"suspend": true})).await;
    let deadline = Instant::now() + cluster_support::WAIT;
    let lp = ListParams::default().labels("app.kubernetes.io/instance=orders");
    while !case.pods().list(&lp).await.expect("list").items.is_empty() {
        assert!(
            Instant::now() < deadline,
            "pods still there\n{}",
            case.dump("orders").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let backlog = case.insert_events(2, 50, 10, 6).await;
    assert!(case.slot_exists(&default_slot_name(&case.ns, "orders")).await);
    let lag = loop {
        let r = case.relays().get("orders").await.expect("relay");
        let lag = r
            .status
            .as_ref()
            .and_then(|s| s.slot.as_ref())
            .and_then(|s| s.lag_bytes);
        let reason = r
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.reason.clone());
        if let (Some(l), Some("Suspended")) = (lag, reason.as_deref())
            && l > 0
        {
            break l;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "no lag in status while suspended\n{}",
            case.dump("orders").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("suspended relay shows lag {lag} bytes");
    case.patch_spec("orders", json!({"suspend": false})).await;
    case.await_ready_pods("orders", 1).await;
    let all: Vec<String> = before.into_iter().chain(backlog).collect();
    case.assert_delivered("orders", &all).await;
}

/// Deleting a relay: the garbage collector removes its Deployment and pods (owner
/// references), the finalizer drops slot and publication with `cleanupPolicy:
/// Delete` and leaves them with `Retain`.
async fn deleted_relay_is_garbage_collected_and_cleaned_up_per_policy() {
    let case = Case::new("gc", 1).await;
    case.create_relay("dropped", case.spec(json!({"cleanupPolicy": "Delete"})))
        .await;
    case.create_relay("kept", case.spec(json!({"cleanupPolicy": "Retain"})))
        .await;
    case.await_ready_pods("dropped", 1).await;
    case.await_ready_pods("kept", 1).await;
    let t = Instant::now();
    for r in ["dropped", "kept"] {
        case.relays()
            .delete(r, &DeleteParams::default())
            .await
            .expect("delete relay");
    }
    let deployments: Api<Deployment> = case.deployments();
    let deadline = Instant::now() + cluster_support::WAIT;
    loop {
        let left_d = deployments
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len();
        let left_p = case
            .pods()
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len();
        let left_r = case
            .relays()
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len();
        if left_d == 0 && left_p == 0 && left_r == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after deleting the relays: {left_r} relays, {left_d} deployments, {left_p} pods left\n{}",
            case.dump("dropped").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "relays deleted -> Deployments and pods collected: {:.1}s",
        t.elapsed().as_secs_f32()
    );
    assert_objects_per_policy(&case, "dropped", "kept").await;
}

/// Delete the whole namespace of two relays (one `Delete`, one `Retain`): the
/// namespace controller deletes the credentials Secret, the pods and the relays at
/// once. The operator's finalizer on the Secret keeps it readable until the relays'
/// cleanup ran, so both finish and the namespace goes; `Delete` leaves no slot or
/// publication behind, `Retain` keeps both.
async fn deleted_namespace_finishes_under_both_policies() {
    let case = Case::new("nsdel", 1).await;
    case.create_relay("dropped", case.spec(json!({"cleanupPolicy": "Delete"})))
        .await;
    case.create_relay("kept", case.spec(json!({"cleanupPolicy": "Retain"})))
        .await;
    case.await_ready_pods("dropped", 1).await;
    case.await_ready_pods("kept", 1).await;
    let ids = case.insert_events(4, 5, 5, 1).await;
    case.assert_delivered("dropped", &ids).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(case.client.clone());
    let t = Instant::now();
    namespaces
        .delete(&case.ns, &DeleteParams::default())
        .await
        .expect("delete namespace");
    let deadline = Instant::now() + cluster_support::WAIT;
    while namespaces.get_opt(&case.ns).await.expect("get namespace").is_some() {
        assert!(
            Instant::now() < deadline,
            "namespace {} still there after {:?}\n{}",
            case.ns,
            cluster_support::WAIT,
            case.dump("dropped").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("namespace deleted -> gone: {:.1}s", t.elapsed().as_secs_f32());
    assert_objects_per_policy(&case, "dropped", "kept").await;
}

/// `mode: Polling` as pods: no slot, two workers of which one polls (the other
/// waits on the advisory lock, Ready as a standby); SIGKILL the active one while
/// events are written: the standby takes the lock over, every event arrives in
/// order per key, and every relayed row leaves the table.
async fn polling_relay_runs_as_pods_and_its_standby_takes_over() {
    let case = Case::new("polling", 3).await;
    case.sql()
        .await
        .batch_execute("ALTER TABLE public.outbox ADD COLUMN seq bigserial")
        .await
        .expect("order column");
    let spec = case.spec(json!({
        "mode": "Polling",
        "polling": {"orderColumn": "seq"},
        "worker": {"replicas": 2}
    }));
    case.create_relay("orders", spec).await;
    let pods = case.await_ready_pods("orders", 2).await;
    let phases = await_phases(&pods, |p| {
        p.iter().filter(|b| *b == "Streaming").count() == 1 && p.iter().filter(|b| *b == "Standby").count() == 1
    })
    .await;
    let (Some(active), Some(standby)) = (
        phases.iter().position(|b| b == "Streaming"),
        phases.iter().position(|b| b == "Standby"),
    ) else {
        panic!(
            "want one polling and one standby worker, got {phases:?}\n{}",
            case.dump("orders").await
        );
    };
    let writer = case.start_writer(5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = kill_and_await_takeover(&case, &pods[active], &pods[standby]).await;
    eprintln!(
        "standby poller active {:.1}s after the active one was killed",
        took.as_secs_f32()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids = writer.stop().await;
    case.assert_delivered("orders", &ids).await;
    let sql = case.sql().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sql
            .query_one("SELECT count(*) FROM public.outbox", &[])
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} relayed rows still in the table");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let slot = default_slot_name(&case.ns, "orders");
    assert!(!case.slot_exists(&slot).await, "a polling relay has no slot");
}

/// The workers' `/readyz` bodies once `ok` holds for them (or after 30 s).
async fn await_phases(pods: &[k8s_openapi::api::core::v1::Pod], ok: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut phases = Vec::new();
        for p in pods {
            phases.push(pod_get(p, "/readyz").await.map(|(_, b)| b).unwrap_or_default());
        }
        if ok(&phases) || Instant::now() > deadline {
            return phases;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// After deleting the relays `dropped` (`cleanupPolicy: Delete`) and `kept`
/// (`Retain`): the first's slot and publication are gone, the second's are there.
async fn assert_objects_per_policy(case: &Case, dropped: &str, kept: &str) {
    let slot = |r| default_slot_name(&case.ns, r);
    let publication = |r| default_publication_name(&case.ns, r);
    assert!(!case.slot_exists(&slot(dropped)).await, "{dropped}'s slot dropped");
    assert!(
        !case.publication_exists(&publication(dropped)).await,
        "{dropped}'s publication dropped"
    );
    assert!(case.slot_exists(&slot(kept)).await, "{kept}'s slot kept");
    assert!(
        case.publication_exists(&publication(kept)).await,
        "{kept}'s publication kept"
    );
}

/// Rotating the database password (in PostgreSQL and in the Secret) rolls the
/// pods, which come back with the new credentials and keep relaying.
async fn rotated_secret_rolls_the_pods() {
    let case = Case::new("rotate", 1).await;
    let role = case.db.clone();
    let sql = case.sql().await;
    sql.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'first-password';
         GRANT CREATE ON DATABASE {role} TO {role};
         ALTER TABLE public.outbox OWNER TO {role};"
    ))
    .await
    .expect("create the relay's role");
    case.put_secret(&role, "first-password").await;
    case.create_relay("orders", case.spec(json!({}))).await;
    let old = names(&case.await_ready_pods("orders", 1).await);
    let first = case.insert_events(2, 5, 5, 1).await;

    sql.batch_execute(&format!("ALTER ROLE {role} PASSWORD 'second-password'"))
        .await
        .expect("rotate the password");
    case.put_secret(&role, "second-password").await;
    let t = Instant::now();
    let new = case.await_replaced("orders", &old, 1).await;
    eprintln!(
        "rotated Secret -> pods rolled and Ready: {:.1}s",
        t.elapsed().as_secs_f32()
    );
    assert_ne!(names(&new), old);
    let second = case.insert_events(2, 5, 5, 6).await;
    let all: Vec<String> = first.into_iter().chain(second).collect();
    case.assert_delivered("orders", &all).await;
}

/// Every request the operator's ServiceAccount made during these tests was
/// allowed: the API server's audit log has no 403 for it. A rule missing from the
/// chart's RBAC fails here (and usually in the test that needed it).
async fn the_chart_grants_every_permission_the_operator_used() {
    let cluster = cluster_support::cluster().await;
    let user = format!("system:serviceaccount:{OPERATOR_NS}:{}", cluster_support::RELEASE);
    let log = std::fs::read_to_string(cluster.kube.audit_log_path()).expect("audit log");
    let mut requests = 0;
    let mut forbidden = Vec::new();
    for line in log.lines() {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if ev["user"]["username"] != user.as_str() {
            continue;
        }
        requests += 1;
        // A namespace being deleted refuses new objects (Events) to everyone: that
        // is not the chart's RBAC.
        let terminating = ev["responseStatus"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("because it is being terminated"));
        if ev["responseStatus"]["code"] == 403 && !terminating {
            let field = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
            forbidden.push(format!(
                "{} {}/{} in namespace {:?}",
                field(&ev["verb"]),
                field(&ev["objectRef"]["apiGroup"]),
                field(&ev["objectRef"]["resource"]),
                field(&ev["objectRef"]["namespace"])
            ));
        }
    }
    assert!(requests > 10, "only {requests} requests of {user} audited");
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC refused the operator: {forbidden:#?}"
    );
}
