//! Collisions the operator's cache cannot see (two operators, each watching its own
//! namespace; or one server under two host names) are caught by the ownership
//! records in PostgreSQL: the second relay gets `Conflict` naming the first, and
//! neither the publication's table nor its record changes hands.

mod operator_support;

use std::time::Duration;

use kube::ResourceExt;
use operator_support::{Harness, condition};
use outbox_operator::api::{OutboxRelay, OutboxRelaySpec};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_another_operator_owns_is_left_alone() {
    let a = Harness::start("rec-a").await;
    let b = Harness::start("rec-b").await;
    a.sql()
        .await
        .batch_execute(&outbox_testbed::OUTBOX_DDL.replace("public.outbox", "public.outbox_b"))
        .await
        .expect("second table");
    let first = a
        .create_relay(
            "first",
            a.spec(json!({"replication": {"publicationName": "records_pub"}})),
        )
        .await;
    a.await_condition("first", "DatabaseReady", "True", Some("Provisioned"))
        .await;

    // Operator B's relay points at A's database, another table, the same publication.
    let spec: OutboxRelaySpec = serde_json::from_value(a.spec(json!({
        "outbox": {"table": "public.outbox_b"},
        "replication": {"publicationName": "records_pub"}
    })))
    .expect("spec");
    b.relays()
        .create(&Default::default(), &OutboxRelay::new("second", spec))
        .await
        .expect("create second");
    let r = b.await_condition("second", "Ready", "False", Some("Conflict")).await;
    let (_, _, message) = condition(&r, "Ready");
    println!("seen only in PostgreSQL: {message}");
    let uid = first.uid().expect("uid");
    assert!(
        message.contains(&format!("belongs to OutboxRelay {}/first (uid {uid})", a.ns)),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(a.publication_tables("records_pub").await, ["public.outbox"]);
    assert!(
        a.publication_comment("records_pub")
            .await
            .unwrap_or_default()
            .contains(&uid)
    );
    a.await_condition("first", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    b.stop().await;
    a.stop().await;
}
