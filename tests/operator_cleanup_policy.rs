//! Deleting a relay: `cleanupPolicy: Delete` drops the slot and the publication
//! before the finalizer lets the resource go; `Retain` keeps both. While the slot
//! cannot be dropped, the resource stays (finalizer kept) and an Event says why and
//! how to get out.

mod operator_support;

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use operator_support::{Harness, closed_port};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_drops_slot_and_publication() {
    let h = Harness::start("op-del").await;
    let (slot, publication) = h.default_names("orders");
    h.create_relay("orders", h.spec(json!({"cleanupPolicy": "Delete"})))
        .await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    assert!(h.slot_exists(&slot).await && h.publication_exists(&publication).await);
    let labels = format!("{{namespace=\"{}\",name=\"orders\"}}", h.ns);
    assert!(h.metric(&format!("outbox_operator_ready{labels}")).is_some());

    h.relays()
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    h.await_gone("orders").await;
    assert!(!h.slot_exists(&slot).await, "slot {slot} dropped");
    assert!(
        !h.publication_exists(&publication).await,
        "publication {publication} dropped"
    );
    // The relay's series go with it.
    assert!(h.metric(&format!("outbox_operator_ready{labels}")).is_none());
    assert!(h.metric(&format!("outbox_operator_slot_lag_bytes{labels}")).is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_drops_a_slot_a_worker_holds() {
    let h = Harness::start("op-del-held").await;
    let (slot, _) = h.default_names("orders");
    h.create_relay("orders", h.spec(json!({}))).await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;

    // A session streaming from the slot, as a worker would.
    let pg = h.pg;
    let mut stream = std::process::Command::new(pg.bin_dir().join("pg_recvlogical"))
        .args([
            "--host",
            pg.host(),
            "--port",
            &pg.port().to_string(),
            "--username",
            pg.user(),
        ])
        .args(["--dbname", &h.db, "--slot", &slot, "--start", "--file", "-"])
        .args(["--option", "proto_version=1", "--option"])
        .arg(format!("publication_names={}", h.default_names("orders").1))
        .env("PGPASSWORD", pg.password())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pg_recvlogical");
    h.await_relay("orders", "the slot to be active", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.slot.as_ref())
            .is_some_and(|s| s.active)
    })
    .await;

    h.relays()
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    h.await_gone("orders").await;
    assert!(
        !h.slot_exists(&slot).await,
        "slot {slot} dropped although it was in use"
    );
    let _ = stream.kill();
    let _ = stream.wait();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_policy_keeps_slot_and_publication() {
    let h = Harness::start("op-retain").await;
    let (slot, publication) = h.default_names("orders");
    h.create_relay("orders", h.spec(json!({"cleanupPolicy": "Retain"})))
        .await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;

    h.relays()
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    h.await_gone("orders").await;
    assert!(h.slot_exists(&slot).await, "slot {slot} kept");
    assert!(
        h.publication_exists(&publication).await,
        "publication {publication} kept"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_blocks_deletion_until_retain() {
    let h = Harness::start("op-del-blocked").await;
    h.create_relay("orders", h.spec(json!({"database": {"port": closed_port()}})))
        .await;
    h.await_condition("orders", "Ready", "False", Some("DatabaseUnreachable"))
        .await;

    h.relays()
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    // The cleanup fails and says how to get out; the resource stays.
    let note = h
        .await_event_with("orders", "DatabaseUnreachable", |note| note.contains("cleanupPolicy"))
        .await;
    assert!(note.contains("Deletion waits"), "{note}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = h
        .relays()
        .get("orders")
        .await
        .expect("the relay stays while its slot may exist");
    assert!(still.metadata.deletion_timestamp.is_some());
    assert_eq!(
        still.metadata.finalizers.as_deref(),
        Some(&["outbox.dev/cleanup".to_string()][..])
    );

    // The way out the Event names.
    h.relays()
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cleanupPolicy": "Retain"}})),
        )
        .await
        .expect("switch to Retain");
    h.await_gone("orders").await;
    h.stop().await;
}
