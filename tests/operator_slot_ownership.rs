//! Two relays that name the same publication or slot in one database: the one that
//! holds it keeps it and keeps working; the other gets `Ready=False` with reason
//! `Conflict` naming the holder, its worker is scaled to zero, and deleting it never
//! drops the holder's objects. A slot made by someone else is not taken without
//! `outbox.dev/adopt`.
//!
//! One test in this binary: its operator watches every namespace, which would
//! reconcile a neighbour test's relays too.

mod operator_support;

use std::time::Duration;

use kube::ResourceExt;
use kube::api::DeleteParams;
use operator_support::{Harness, Options, condition};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_names_are_refused_and_the_holder_keeps_working() {
    let h = Harness::start_with(
        "own",
        Options {
            watch_all: true,
            ..Options::default()
        },
    )
    .await;
    let other = h.extra_namespace("own-b").await;
    // The second relay streams another table of the same database.
    h.sql()
        .await
        .batch_execute(&outbox_testbed::OUTBOX_DDL.replace("public.outbox", "public.outbox_b"))
        .await
        .expect("second table");

    // Same publication name, two namespaces.
    let first = h
        .create_relay(
            "first",
            h.spec(json!({"replication": {"publicationName": "shared_pub"}})),
        )
        .await;
    h.await_condition("first", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let second_spec = h.spec(json!({
        "outbox": {"table": "public.outbox_b"},
        "replication": {"publicationName": "shared_pub"}
    }));
    let second: outbox_operator::api::OutboxRelaySpec = serde_json::from_value(second_spec).expect("spec");
    h.relays_in(&other)
        .create(
            &Default::default(),
            &outbox_operator::api::OutboxRelay::new("second", second),
        )
        .await
        .expect("create second");
    let r = h
        .await_condition_in(&other, "second", "Ready", "False", Some("Conflict"))
        .await;
    let (_, _, message) = condition(&r, "Ready");
    println!("second relay, same publication: {message}");
    assert!(
        message.contains(&format!("OutboxRelay {}/first", h.ns)) && message.contains("publicationName"),
        "{message}"
    );
    let events = h.events_in(&other, "second").await;
    assert!(
        events.iter().any(|(reason, _)| reason == "Conflict"),
        "a Warning Event with reason Conflict: {events:?}"
    );
    let labels = format!("{{namespace=\"{other}\",name=\"second\"}}");
    assert_eq!(h.metric(&format!("outbox_operator_conflict{labels}")), Some(1.0));
    let d = h
        .deployments_in(&other)
        .get("second-relay")
        .await
        .expect("second's Deployment");
    assert_eq!(
        d.spec.and_then(|s| s.replicas),
        Some(0),
        "a conflicting relay runs no worker"
    );

    // Several reconciles later the publication still points at the first relay's
    // table and carries its record: nothing flips back and forth.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(h.publication_tables("shared_pub").await, ["public.outbox"]);
    let comment = h.publication_comment("shared_pub").await.unwrap_or_default();
    assert!(
        comment.contains(&first.uid().expect("uid")),
        "the record names the first relay: {comment}"
    );
    let r = h
        .await_condition("first", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let binding = r.status.and_then(|s| s.binding).expect("first's binding");
    assert_eq!(binding.publication, "shared_pub");

    // Same slot name, two namespaces.
    h.create_relay("third", h.spec(json!({"replication": {"slotName": "shared_slot"}})))
        .await;
    h.await_condition("third", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let fourth: outbox_operator::api::OutboxRelaySpec = serde_json::from_value(h.spec(json!({
        "outbox": {"table": "public.outbox_b"},
        "replication": {"slotName": "shared_slot"}
    })))
    .expect("spec");
    h.relays_in(&other)
        .create(
            &Default::default(),
            &outbox_operator::api::OutboxRelay::new("fourth", fourth),
        )
        .await
        .expect("create fourth");
    let r = h
        .await_condition_in(&other, "fourth", "Ready", "False", Some("Conflict"))
        .await;
    let (_, _, message) = condition(&r, "Ready");
    println!("fourth relay, same slot: {message}");
    assert!(
        message.contains("replication slot \"shared_slot\"") && message.contains(&format!("{}/third", h.ns)),
        "{message}"
    );

    // Deleting the relays that lost (cleanupPolicy Delete) drops nothing of the holders'.
    for name in ["second", "fourth"] {
        h.relays_in(&other)
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    for name in ["second", "fourth"] {
        h.await_relay_gone_in(&other, name).await;
    }
    assert!(h.slot_exists("shared_slot").await, "third's slot survives");
    assert!(h.publication_exists("shared_pub").await, "first's publication survives");
    assert_eq!(h.publication_tables("shared_pub").await, ["public.outbox"]);
    h.await_condition("third", "DatabaseReady", "True", Some("Provisioned"))
        .await;

    // A slot made by hand is nobody's: refused until adopted.
    let c = h.pg.client(&h.db).await.expect("connect");
    c.query_one(
        "SELECT lsn::text FROM pg_create_logical_replication_slot('hand_slot', 'pgoutput')",
        &[],
    )
    .await
    .expect("create a slot by hand");
    h.create_relay("fifth", h.spec(json!({"replication": {"slotName": "hand_slot"}})))
        .await;
    let r = h.await_condition("fifth", "Ready", "False", Some("Conflict")).await;
    let (_, _, message) = condition(&r, "Ready");
    println!("fifth relay, slot made by hand: {message}");
    assert!(
        message.contains("no OutboxRelay owns it") && message.contains("outbox.dev/adopt"),
        "{message}"
    );
    h.annotate("fifth", "outbox.dev/adopt", "true").await;
    h.await_condition("fifth", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    h.await_event("fifth", "Adopted").await;
    h.stop().await;
}
