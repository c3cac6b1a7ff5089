//! An operator given a list of namespaces (a namespaced install) reconciles the
//! relays of every namespace on the list from one merged cache, so two of them
//! naming the same publication still collide, and it leaves the relays of any
//! other namespace alone: no finalizer, no status, nothing provisioned.
//!
//! The chart's Roles for this mode, and that such an operator cannot read other
//! namespaces, are checked on the real cluster (`cluster_relay`).

mod operator_support;

use std::time::Duration;

use kube::ResourceExt;
use operator_support::{Harness, Options, condition};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_list_is_watched_as_one_and_other_namespaces_are_left_alone() {
    let h = Harness::start_with(
        "scope",
        Options {
            also_watch: &["scope-b"],
            ..Options::default()
        },
    )
    .await;
    let second = h.watched[0].clone();
    let outside = h.extra_namespace("scope-out").await;
    h.sql()
        .await
        .batch_execute(&outbox_testbed::OUTBOX_DDL.replace("public.outbox", "public.outbox_b"))
        .await
        .expect("second table");

    // One relay in each watched namespace, and one outside the list.
    h.create_relay("first", h.spec(json!({}))).await;
    let spec = |patch| serde_json::from_value(h.spec(patch)).expect("spec");
    h.relays_in(&second)
        .create(
            &Default::default(),
            &outbox_operator::api::OutboxRelay::new("second", spec(json!({"outbox": {"table": "public.outbox_b"}}))),
        )
        .await
        .expect("create second");
    h.relays_in(&outside)
        .create(
            &Default::default(),
            &outbox_operator::api::OutboxRelay::new(
                "unwatched",
                spec(json!({"replication": {"slotName": "unwatched_slot", "publicationName": "unwatched_pub"}})),
            ),
        )
        .await
        .expect("create unwatched");

    h.await_condition("first", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let r = h
        .await_condition_in(&second, "second", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    assert!(
        r.finalizers().iter().any(|f| f.starts_with("outbox.dev/")),
        "the relay of the second watched namespace carries the operator's finalizer: {:?}",
        r.finalizers()
    );

    // The same publication in both watched namespaces: the merged cache sees both.
    h.relays_in(&second)
        .create(
            &Default::default(),
            &outbox_operator::api::OutboxRelay::new(
                "copycat",
                spec(json!({
                    "outbox": {"table": "public.outbox_b"},
                    "replication": {"publicationName": h.default_names("first").1}
                })),
            ),
        )
        .await
        .expect("create copycat");
    let r = h
        .await_condition_in(&second, "copycat", "Ready", "False", Some("Conflict"))
        .await;
    let (_, _, message) = condition(&r, "Ready");
    assert!(message.contains("first"), "the conflict names the holder: {message}");

    // Several requeues later, the relay outside the list is as it was applied.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = h.relays_in(&outside).get("unwatched").await.expect("get unwatched");
    assert!(
        r.finalizers().is_empty(),
        "an unwatched relay got a finalizer: {:?}",
        r.finalizers()
    );
    assert!(r.status.is_none(), "an unwatched relay got a status: {:?}", r.status);
    assert!(
        !h.slot_exists("unwatched_slot").await,
        "an unwatched relay's slot was created"
    );
    assert!(
        !h.publication_exists("unwatched_pub").await,
        "an unwatched relay's publication was created"
    );
    h.stop().await;
}
