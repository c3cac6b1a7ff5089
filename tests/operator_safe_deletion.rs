//! Deleting a relay with `cleanupPolicy: Delete` drains first: the slot is dropped
//! only once every event written before the delete reached Kafka, or, when that
//! cannot happen, after `spec.drainTimeoutSeconds` or `outbox.dev/force-delete`,
//! with a Warning Event that names what was dropped unrelayed. The Secrets cleanup
//! needs are protected by a finalizer, so a namespace deletion that removes them
//! first cannot strand the relay.

mod operator_support;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};
use operator_support::{Harness, SECRET, condition};
use outbox_operator::api::OutboxRelaySpec;
use outbox_operator::relay::config::{Credentials, RelayConfig};
use outbox_operator::relay::worker::{self, RelayHandle};
use outbox_testbed::{shared, unique_name};
use serde_json::{Value, json};
use tokio::sync::watch;

/// A relay spec that streams to a real topic of the bed's Kafka.
async fn streaming_spec(h: &Harness, patch: Value) -> (Value, String) {
    let bed = shared().await;
    let topic = format!("{}.events", unique_name("drain"));
    bed.kafka.create_topic(&topic, 3).await.expect("topic");
    let mut spec = h.spec(
        json!({"kafka": {"bootstrapServers": bed.kafka.bootstrap(), "topic": topic,
                                          "producer": {"lingerMs": 2}}}),
    );
    operator_support::merge(&mut spec, patch);
    (spec, topic)
}

/// The worker, in this process, as the Deployment would run it.
fn start_worker(h: &Harness, name: &str, spec: &Value) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let spec: OutboxRelaySpec = serde_json::from_value(spec.clone()).expect("spec");
    let creds = Credentials {
        db_username: h.pg.user().to_string(),
        db_password: Some(h.pg.password().to_string()),
        ..Credentials::default()
    };
    let cfg = RelayConfig::from_spec(&h.ns, name, &spec, &creds).expect("worker config");
    let (tx, rx) = watch::channel(false);
    (tx, tokio::spawn(worker::run(cfg, RelayHandle::new(), rx)))
}

async fn insert(h: &Harness, n: usize) -> HashSet<String> {
    h.sql()
        .await
        .query(
            &format!(
                "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
                 SELECT 'Order', 'o-' || (i % 7), 'OrderCreated', jsonb_build_object('i', i)
                 FROM generate_series(1, {n}) i RETURNING id::text"
            ),
            &[],
        )
        .await
        .expect("insert")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_while_lagging_drains_every_event_before_dropping_the_slot() {
    let h = Harness::start("drain").await;
    let (slot, publication) = h.default_names("orders");
    let (spec, topic) = streaming_spec(&h, json!({})).await;
    h.create_relay("orders", spec.clone()).await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;

    // The relay falls behind: events written while no worker runs.
    let ids = insert(&h, 300).await;
    h.relays()
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    h.await_condition("orders", "Ready", "False", Some("Draining")).await;
    // The first pass records the target; the next one looks into the slot.
    let r = h
        .await_relay("orders", "the drain to count what waits", |r| {
            r.status
                .as_ref()
                .and_then(|s| outbox_operator::api::conditions::find(&s.conditions, "Ready"))
                .is_some_and(|c| c.message.contains("events wait in the slot"))
        })
        .await;
    let (_, _, message) = condition(&r, "Ready");
    println!("draining: {message}");
    assert!(message.contains("300 events wait in the slot"), "{message}");
    let target = r.status.and_then(|s| s.drain).expect("status.drain").target_lsn;
    assert!(message.contains(&target), "{message}");
    h.await_event("orders", "Draining").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(h.slot_exists(&slot).await, "a lagging slot is not dropped");

    // A worker drains it; then the slot goes.
    let (stop, task) = start_worker(&h, "orders", &spec);
    h.await_gone("orders").await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    assert!(!h.slot_exists(&slot).await && !h.publication_exists(&publication).await);
    let bed = shared().await;
    let records = support::consume_async(
        &bed.kafka.bootstrap(),
        &topic,
        &ids,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    support::assert_all_delivered(&records, &ids);
    let events = h.events("orders").await;
    let dropped = events
        .iter()
        .find(|(reason, _)| reason == "SlotDropped")
        .map(|(_, n)| n.clone())
        .unwrap_or_default();
    println!("dropped: {dropped}");
    assert!(dropped.contains("Drained") && dropped.contains(&target), "{events:?}");
    assert!(!events.iter().any(|(r, _)| r == "DroppedUnrelayed"), "{events:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_and_timeout_end_a_drain_and_name_what_was_dropped() {
    let h = Harness::start("force").await;
    let (spec, _) = streaming_spec(&h, json!({})).await;
    h.create_relay("forced", spec.clone()).await;
    let (timeout_spec, _) = streaming_spec(&h, json!({"drainTimeoutSeconds": 3})).await;
    h.create_relay("timed", timeout_spec).await;
    for name in ["forced", "timed"] {
        h.await_condition(name, "DatabaseReady", "True", Some("Provisioned"))
            .await;
    }
    let ids = insert(&h, 5).await;
    for name in ["forced", "timed"] {
        h.relays().delete(name, &DeleteParams::default()).await.expect("delete");
    }
    h.await_condition("forced", "Ready", "False", Some("Draining")).await;
    h.annotate("forced", "outbox.dev/force-delete", "true").await;

    for (name, why) in [
        ("forced", "outbox.dev/force-delete=true"),
        ("timed", "drain timeout of 3 s"),
    ] {
        h.await_gone(name).await;
        let (slot, _) = h.default_names(name);
        assert!(!h.slot_exists(&slot).await);
        let note = h
            .events(name)
            .await
            .into_iter()
            .find(|(r, _)| r == "DroppedUnrelayed")
            .map(|(_, n)| n)
            .unwrap_or_else(|| panic!("{name}: no DroppedUnrelayed Event"));
        println!("{name}: {note}");
        assert!(note.contains(why) && note.contains("5 events"), "{note}");
        let named: Vec<&String> = ids.iter().filter(|id| note.contains(id.as_str())).collect();
        assert_eq!(named.len(), 5, "every dropped event is named: {note}");
    }
    assert_eq!(h.metric("outbox_operator_deletions_dropped_unrelayed_total"), Some(2.0));
    assert_eq!(h.metric("outbox_operator_unrelayed_events_dropped_total"), Some(10.0));
    h.stop().await;
}

/// What a namespace deletion does to a relay's objects, in the order it does it:
/// the Secrets go (or try to) before the relay's cleanup has run. The bed has no
/// namespace controller, so the test deletes them itself; the real cluster's test
/// deletes the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_finishes_when_the_secret_was_deleted_first() {
    let h = Harness::start("nsdel").await;
    for policy in ["Delete", "Retain"] {
        let name = policy.to_lowercase();
        h.create_relay(&name, h.spec(json!({"cleanupPolicy": policy}))).await;
        h.await_condition(&name, "DatabaseReady", "True", Some("Provisioned"))
            .await;
    }
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &h.ns);
    let s = secrets.get(SECRET).await.expect("secret");
    assert!(
        s.metadata.finalizers.iter().flatten().any(|f| f == "outbox.dev/in-use"),
        "{:?}",
        s.metadata.finalizers
    );
    secrets
        .delete(SECRET, &DeleteParams::default())
        .await
        .expect("delete secret");
    for name in ["delete", "retain"] {
        h.relays()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete relay");
    }
    for name in ["delete", "retain"] {
        h.await_gone(name).await;
    }
    let (deleted_slot, deleted_pub) = h.default_names("delete");
    assert!(!h.slot_exists(&deleted_slot).await && !h.publication_exists(&deleted_pub).await);
    let (kept_slot, kept_pub) = h.default_names("retain");
    assert!(h.slot_exists(&kept_slot).await && h.publication_exists(&kept_pub).await);
    // With no relay left that needs it, the Secret's deletion completes.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while secrets.get_opt(SECRET).await.expect("get secret").is_some() {
        assert!(std::time::Instant::now() < deadline, "the Secret was released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.stop().await;
}
